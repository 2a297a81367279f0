//! The husk agent API, generated from `proto/*.proto` with ttrpc-codegen.
//!
//! Both ends use it: `husk-agent` serves [`agent_ttrpc::Agent`] and
//! [`health_ttrpc::Health`] on guest vsock port [`AGENT_VSOCK_PORT`];
//! `husk-runtime` calls them through the generated clients.

/// Declares one generated module; the generators' own inner lint
/// attributes are stripped by build.rs, so they are restated here.
macro_rules! generated {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {$(
        $(#[$doc])*
        #[allow(
            missing_docs, unused, dead_code, non_camel_case_types, non_snake_case,
            non_upper_case_globals, unreachable_pub, clippy::all, clippy::pedantic,
            clippy::undocumented_unsafe_blocks
        )]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", stringify!($name), ".rs"));
        }
    )*};
}

generated! {
    /// Messages of `proto/health.proto`.
    health,
    /// ttrpc client and server of the `Health` service.
    health_ttrpc,
    /// Messages of `proto/agent.proto`.
    agent,
    /// ttrpc client and server of the `Agent` service.
    agent_ttrpc,
}

/// Guest vsock port on which husk-agent serves the API.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Version of the agent API described by these protos; bumped when an RPC
/// changes meaning.
pub const API_VERSION: u32 = 1;
