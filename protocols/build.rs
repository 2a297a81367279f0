//! Compiles the agent API protos into Rust messages and ttrpc services.

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let protos = ["proto/health.proto", "proto/agent.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Codegen::new()
        .inputs(protos)
        .include("proto")
        .rust_protobuf()
        .customize(Customize::default())
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent API from proto/ failed: check the .proto files");
    strip_inner_attributes();
}

/// `include!` cannot take files with inner attributes (`#![...]`) or inner
/// doc comments, which the generators emit; the crate sets the equivalent lints itself.
fn strip_inner_attributes() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for entry in std::fs::read_dir(&out).expect("reading OUT_DIR") {
        let path = entry.expect("OUT_DIR entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("reading generated code");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let l = l.trim_start();
                    !l.starts_with("#![") && !l.starts_with("//!")
                })
                .collect();
            std::fs::write(&path, kept.join("\n")).expect("writing generated code");
        }
    }
}
