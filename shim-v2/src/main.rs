//! `containerd-shim-husk-v2`: containerd's shim v2 binary for husk.

fn main() {
    let config = containerd_shim::Config {
        // husk-runtime waits for its own children (VMM, vsock backend,
        // virtiofsd); a reaper calling waitpid(-1) would steal their exits.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<husk_shim::shim::HuskShim>(husk_shim::RUNTIME_ID, Some(config));
}
