//! The shim's configuration: the runtime config file (TOML), where it is,
//! and pod sizing.
//!
//! Precedence, lowest first: husk-runtime's built-in defaults; the config
//! file; the `HUSK_*` environment variables (`HUSK_KERNEL`,
//! `HUSK_INITRAMFS`, `HUSK_BACKEND`, `HUSK_RUN_DIR`, `HUSK_KERNEL_PARAMS`,
//! `HUSK_VIRTIOFSD`);
//! then, for one pod's VM size, the sandbox container's resources and the
//! `io.husk.vcpus` / `io.husk.memory_mib` annotations.
//!
//! The file is the `ConfigPath` of containerd's runtime options (ctr's
//! `--runtime-config-path`, the CRI runtime's `options.ConfigPath`), else
//! `$HUSK_CONFIG`, else `/etc/husk/config.toml`. A missing default file
//! means defaults; a missing file that was asked for is an error.

use std::path::{Path, PathBuf};

use husk_runtime::config::BackendSetting;
use husk_runtime::RuntimeConfig;
use serde::Deserialize;

use crate::error::{Result, ShimError};

/// Where the config file is when nothing says otherwise.
pub const DEFAULT_PATH: &str = "/etc/husk/config.toml";
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "HUSK_CONFIG";
/// Pod annotation: vCPUs of the pod's VM.
pub const VCPUS_ANNOTATION: &str = "io.husk.vcpus";
/// Pod annotation: memory of the pod's VM, MiB.
pub const MEMORY_ANNOTATION: &str = "io.husk.memory_mib";
/// containerd's CRI annotation on a pod's sandbox container (1.6.7 and
/// later): the CFS quota of the pod's containers together, µs per period;
/// from the kubelet's PodSandboxConfig `linux.resources` (1.23 and later).
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// containerd's CRI annotation: the CFS period of [`CRI_SANDBOX_CPU_QUOTA`], µs.
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// containerd's CRI annotation: the memory limits of the pod's containers
/// together, bytes.
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// containerd's type URL of the runtime options of non-runc runtimes.
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// Kernel parameters that `debug_console` adds: the agent logs at debug
/// level and the kernel prints everything to the console.
const DEBUG_PARAMS: &str = "husk.log=debug loglevel=7";
/// Smallest VM the annotations may ask for, MiB.
const MIN_MEMORY_MIB: u32 = 64;

/// The config file, as written (`/etc/husk/config.toml`). Every key is
/// optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Guest kernel (ELF vmlinux).
    pub kernel: Option<PathBuf>,
    /// initramfs with husk-agent as /init.
    pub initramfs: Option<PathBuf>,
    /// `auto`, `qemu-kvm`, `qemu-tcg` or `husk-vmm`.
    pub backend: Option<String>,
    /// vCPUs of a pod VM unless the pod asks for more.
    pub default_vcpus: Option<u8>,
    /// Memory of a pod VM, MiB, before the pod's own limits.
    pub default_memory_mib: Option<u32>,
    /// Guest console at debug level, copied into the shim's log when the
    /// VM stops.
    pub debug_console: Option<bool>,
    /// Extra kernel command-line words.
    pub kernel_params: Option<String>,
    /// Where sandboxes keep their state (default `/run/husk`).
    pub run_dir: Option<PathBuf>,
    /// virtiofsd binary (default: from PATH, `~/.cargo/bin` or
    /// `/usr/libexec`).
    pub virtiofsd: Option<PathBuf>,
    /// QEMU binary (default: `qemu-system-x86_64` from PATH).
    pub qemu: Option<PathBuf>,
}

impl ConfigFile {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<ConfigFile> {
        toml::from_str(text).map_err(|e| {
            ShimError::InvalidArgument(format!(
                "config file {origin:?}: {}; keys: kernel, initramfs, backend, default_vcpus, \
                 default_memory_mib, debug_console, kernel_params, run_dir, virtiofsd, qemu",
                e.message()
            ))
        })
    }

    /// Reads the file at `path`. A missing file is empty when `required`
    /// is false (the default path), an error otherwise.
    pub fn load(path: &Path, required: bool) -> Result<ConfigFile> {
        match std::fs::read_to_string(path) {
            Ok(text) => ConfigFile::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(ConfigFile::default())
            }
            Err(e) => Err(ShimError::io(
                format!(
                    "reading the husk config file {path:?} (write it, or point ConfigPath \
                     or {CONFIG_ENV} at one; `make install` writes {DEFAULT_PATH})"
                ),
                e,
            )),
        }
    }
}

/// The config file to read: `explicit` (runtime options' ConfigPath), else
/// `$HUSK_CONFIG`, else the default; and whether it must exist.
pub fn config_path(explicit: Option<&str>, env: Option<String>) -> (PathBuf, bool) {
    match explicit
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .or(env)
    {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_PATH), false),
    }
}

/// Applies the file to `cfg` (built by [`RuntimeConfig::from_env`]) where
/// the environment did not set the value (`env_set(name)`).
pub fn apply_file(
    cfg: &mut RuntimeConfig,
    file: &ConfigFile,
    env_set: impl Fn(&str) -> bool,
) -> Result<()> {
    let unset = |var: &str| !env_set(var);
    if let (Some(k), true) = (&file.kernel, unset("HUSK_KERNEL")) {
        cfg.kernel = k.clone();
    }
    if let (Some(i), true) = (&file.initramfs, unset("HUSK_INITRAMFS")) {
        cfg.initramfs = i.clone();
    }
    if let (Some(b), true) = (&file.backend, unset("HUSK_BACKEND")) {
        cfg.backend = BackendSetting::parse(b)?;
    }
    if let (Some(d), true) = (&file.run_dir, unset("HUSK_RUN_DIR")) {
        cfg.run_root = d.clone();
    }
    if let (Some(p), true) = (&file.kernel_params, unset("HUSK_KERNEL_PARAMS")) {
        cfg.kernel_params = p.clone();
    }
    if let (Some(v), true) = (&file.virtiofsd, unset("HUSK_VIRTIOFSD")) {
        cfg.virtiofsd = Some(v.clone());
    }
    if let Some(q) = &file.qemu {
        cfg.qemu_binary = Some(q.clone());
    }
    if let Some(v) = file.default_vcpus {
        cfg.vcpus = check_vcpus(u64::from(v), "default_vcpus")?;
    }
    if let Some(m) = file.default_memory_mib {
        cfg.memory_mib = check_memory(u64::from(m), "default_memory_mib")?;
    }
    if file.debug_console == Some(true) {
        cfg.kernel_params = format!("{} {DEBUG_PARAMS}", cfg.kernel_params)
            .trim()
            .to_string();
    }
    Ok(())
}

fn check_vcpus(v: u64, what: &str) -> Result<u8> {
    u8::try_from(v)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| ShimError::InvalidArgument(format!("{what} = {v}: use 1 to 255 vCPUs")))
}

fn check_memory(m: u64, what: &str) -> Result<u32> {
    u32::try_from(m)
        .ok()
        .filter(|m| *m >= MIN_MEMORY_MIB)
        .ok_or_else(|| {
            ShimError::InvalidArgument(format!(
                "{what} = {m}: use at least {MIN_MEMORY_MIB} MiB (and less than 4 TiB)"
            ))
        })
}

/// Sizes the pod's VM from the sandbox container's OCI spec (JSON), in
/// this order:
/// - CPU limits raise the vCPUs to cover them: the spec's
///   `linux.resources.cpu` quota/period, and containerd's CRI annotations
///   [`CRI_SANDBOX_CPU_QUOTA`]/[`CRI_SANDBOX_CPU_PERIOD`] (the limits of all
///   the pod's containers);
/// - memory limits are added to the configured memory (the guest kernel and
///   agent live in that): `linux.resources.memory.limit` and
///   [`CRI_SANDBOX_MEMORY`];
/// - the `io.husk.vcpus` / `io.husk.memory_mib` annotations, when present,
///   set the size outright.
///
/// Unlimited or unset values (0, -1) change nothing; an annotation that is
/// not a number is an error that names it.
pub fn size_pod(cfg: &mut RuntimeConfig, spec: &serde_json::Value) -> Result<()> {
    let annotation = |key: &str| -> Result<Option<i64>> {
        match spec["annotations"][key].as_str() {
            None => Ok(None),
            Some(s) => s.trim().parse::<i64>().map(Some).map_err(|_| {
                ShimError::InvalidArgument(format!(
                    "annotation {key}={s:?}: expected a whole number"
                ))
            }),
        }
    };
    let res = &spec["linux"]["resources"];
    let cpu_limits = [
        (res["cpu"]["quota"].as_i64(), res["cpu"]["period"].as_i64()),
        (
            annotation(CRI_SANDBOX_CPU_QUOTA)?,
            annotation(CRI_SANDBOX_CPU_PERIOD)?,
        ),
    ];
    for (quota, period) in cpu_limits {
        if let (Some(q), Some(p)) = (quota.filter(|q| *q > 0), period.filter(|p| *p > 0)) {
            let need = (q as u64).div_ceil(p as u64);
            cfg.vcpus = cfg.vcpus.max(u8::try_from(need).unwrap_or(u8::MAX));
        }
    }
    let memory_limits = [
        res["memory"]["limit"].as_i64(),
        annotation(CRI_SANDBOX_MEMORY)?,
    ];
    for limit in memory_limits.into_iter().flatten().filter(|l| *l > 0) {
        let mib = (limit as u64).div_ceil(1 << 20);
        cfg.memory_mib = cfg
            .memory_mib
            .saturating_add(u32::try_from(mib).unwrap_or(u32::MAX));
    }
    let size = |key: &str| -> Result<Option<u64>> {
        annotation(key)?
            .map(|v| {
                u64::try_from(v).map_err(|_| {
                    ShimError::InvalidArgument(format!(
                        "annotation {key}={v}: must not be negative"
                    ))
                })
            })
            .transpose()
    };
    if let Some(v) = size(VCPUS_ANNOTATION)? {
        cfg.vcpus = check_vcpus(v, VCPUS_ANNOTATION)?;
    }
    if let Some(m) = size(MEMORY_ANNOTATION)? {
        cfg.memory_mib = check_memory(m, MEMORY_ANNOTATION)?;
    }
    Ok(())
}

/// The `ConfigPath` of containerd's runtime options for non-runc runtimes
/// (`runtimeoptions.v1.Options`: type_url = 1, config_path = 2,
/// config_body = 3), given the options' type URL and encoded value.
pub fn options_config_path(type_url: &str, value: &[u8]) -> Option<String> {
    if type_url.trim_start_matches('/') != RUNTIME_OPTIONS_TYPE {
        return None;
    }
    use containerd_shim::protos::protobuf::CodedInputStream;
    let mut is = CodedInputStream::from_bytes(value);
    let mut path = None;
    while let Ok(Some(tag)) = is.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            path = Some(is.read_string().ok()?);
        } else if is.skip_field(wire_type(wire)?).is_err() {
            return None;
        }
    }
    path.filter(|p| !p.is_empty())
}

fn wire_type(w: u32) -> Option<containerd_shim::protos::protobuf::rt::WireType> {
    containerd_shim::protos::protobuf::rt::WireType::new(w)
}

/// The runtime config of a new sandbox: defaults, the config file at
/// `path`, the environment, then sized for the pod from the sandbox
/// container's bundle. Returns it with whether the debug console is on.
pub fn sandbox_config(path: &Path, required: bool, bundle: &Path) -> Result<(RuntimeConfig, bool)> {
    let file = ConfigFile::load(path, required)?;
    let mut cfg = RuntimeConfig::from_env()?;
    apply_file(&mut cfg, &file, |v| std::env::var_os(v).is_some())?;
    let spec = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    size_pod(&mut cfg, &spec)?;
    // The pod's network namespace (CNI's, under containerd's CRI plugin): the VM takes over
    // its interfaces.
    cfg.network_namespace = husk_runtime::network::netns_of_spec(&spec);
    // The pod's hostname (the sandbox container's): its containers share the VM's UTS
    // namespace, as they would share the pause container's.
    cfg.hostname = spec["hostname"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_string);
    Ok((cfg, file.debug_console == Some(true)))
}

/// The bundle's `linux.cgroupsPath`, where the sandbox's host processes
/// go (see [`husk_runtime::host_cgroup`]); None when unset or empty.
pub fn cgroups_path(bundle: &Path) -> Result<Option<String>> {
    let spec = husk_runtime::bundle::load_spec(bundle)?;
    Ok(husk_runtime::host_cgroup::cgroups_path_of(&spec))
}

/// The file in a bundle that records the ConfigPath `start` was given,
/// for `delete` (which containerd runs without options).
pub const BUNDLE_RECORD: &str = "husk-config-path";

/// The run root `delete` cleans up under for the container of `bundle`:
/// from the config file `start` used (recorded in the bundle), the
/// environment, or the default. Errors fall back to the default.
pub fn cleanup_run_root(bundle: &Path) -> PathBuf {
    let recorded = std::fs::read_to_string(bundle.join(BUNDLE_RECORD)).ok();
    let (path, _) = config_path(recorded.as_deref(), std::env::var(CONFIG_ENV).ok());
    let file = ConfigFile::load(&path, false).unwrap_or_default();
    match RuntimeConfig::from_env() {
        Ok(mut cfg) => {
            let _ = apply_file(&mut cfg, &file, |v| std::env::var_os(v).is_some());
            cfg.run_root
        }
        Err(_) => PathBuf::from("/run/husk"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_runtime::hypervisor::BackendKind;
    use serde_json::json;

    fn base() -> RuntimeConfig {
        let mut c = RuntimeConfig::from_env().unwrap();
        c.vcpus = 1;
        c.memory_mib = 256;
        c
    }

    const FULL: &str = r#"
kernel = "/usr/share/husk/vmlinux"
initramfs = "/usr/share/husk/initramfs.cpio"
backend = "qemu-tcg"
default_vcpus = 2
default_memory_mib = 512
debug_console = true
kernel_params = "noapictimer"
run_dir = "/run/husk2"
virtiofsd = "/usr/libexec/virtiofsd"
qemu = "/opt/qemu/bin/qemu-system-x86_64"
"#;

    #[test]
    fn a_full_file_parses_and_applies() {
        let f = ConfigFile::parse(FULL, Path::new("t.toml")).unwrap();
        assert_eq!(f.default_vcpus, Some(2));
        let mut c = base();
        apply_file(&mut c, &f, |_| false).unwrap();
        assert_eq!(c.kernel, Path::new("/usr/share/husk/vmlinux"));
        assert_eq!(c.initramfs, Path::new("/usr/share/husk/initramfs.cpio"));
        assert_eq!(c.backend, BackendSetting::Fixed(BackendKind::QemuTcg));
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.run_root, Path::new("/run/husk2"));
        assert_eq!(
            c.virtiofsd.as_deref(),
            Some(Path::new("/usr/libexec/virtiofsd"))
        );
        assert_eq!(
            c.qemu_binary.as_deref(),
            Some(Path::new("/opt/qemu/bin/qemu-system-x86_64"))
        );
        assert_eq!(c.kernel_params, "noapictimer husk.log=debug loglevel=7");
    }

    #[test]
    fn environment_variables_beat_the_file() {
        let f = ConfigFile::parse(FULL, Path::new("t.toml")).unwrap();
        let mut c = base();
        c.kernel = "/env/vmlinux".into();
        c.backend = BackendSetting::Auto;
        c.kernel_params = "env=1".into();
        let set = ["HUSK_KERNEL", "HUSK_BACKEND", "HUSK_KERNEL_PARAMS"];
        apply_file(&mut c, &f, |v| set.contains(&v)).unwrap();
        assert_eq!(c.kernel, Path::new("/env/vmlinux"));
        assert_eq!(c.backend, BackendSetting::Auto);
        assert_eq!(c.kernel_params, "env=1 husk.log=debug loglevel=7");
        // Not set in the environment: from the file.
        assert_eq!(c.initramfs, Path::new("/usr/share/husk/initramfs.cpio"));
    }

    #[test]
    fn an_empty_file_changes_nothing() {
        let f = ConfigFile::parse("# nothing\n", Path::new("t.toml")).unwrap();
        assert_eq!(f, ConfigFile::default());
        let mut c = base();
        let before = format!("{c:?}");
        apply_file(&mut c, &f, |_| false).unwrap();
        assert_eq!(format!("{c:?}"), before);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let e = ConfigFile::parse("vcpus = 2\n", Path::new("/etc/husk/config.toml")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/etc/husk/config.toml") && s.contains("vcpus"),
            "{s}"
        );
        assert!(s.contains("default_vcpus"), "lists the keys: {s}");
        let e = ConfigFile::parse("default_vcpus = \"two\"\n", Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("default_vcpus"), "{e}");
        let f = ConfigFile::parse("backend = \"xen\"\n", Path::new("c")).unwrap();
        let e = apply_file(&mut base(), &f, |_| false).unwrap_err();
        assert!(e.to_string().contains("qemu-tcg"), "{e}");
        let f = ConfigFile::parse("default_vcpus = 0\n", Path::new("c")).unwrap();
        assert!(apply_file(&mut base(), &f, |_| false).is_err());
        let f = ConfigFile::parse("default_memory_mib = 16\n", Path::new("c")).unwrap();
        let e = apply_file(&mut base(), &f, |_| false).unwrap_err();
        assert!(e.to_string().contains("at least 64 MiB"), "{e}");
    }

    #[test]
    fn which_file_is_read() {
        assert_eq!(
            config_path(None, None),
            (PathBuf::from(DEFAULT_PATH), false)
        );
        assert_eq!(
            config_path(None, Some("/e.toml".into())),
            (PathBuf::from("/e.toml"), true)
        );
        assert_eq!(
            config_path(Some("/o.toml"), Some("/e.toml".into())),
            (PathBuf::from("/o.toml"), true)
        );
        assert_eq!(
            config_path(Some(""), Some(String::new())),
            (PathBuf::from(DEFAULT_PATH), false)
        );
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("none.toml");
        assert_eq!(
            ConfigFile::load(&missing, false).unwrap(),
            ConfigFile::default()
        );
        let e = ConfigFile::load(&missing, true).unwrap_err();
        assert!(e.to_string().contains("none.toml"), "{e}");
    }

    #[test]
    fn pods_are_sized_from_resources_then_annotations() {
        let mut c = base();
        size_pod(&mut c, &json!({})).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (1, 256));
        let spec = json!({"linux": {"resources": {
            "cpu": {"quota": 250000, "period": 100000},
            "memory": {"limit": 100 * 1024 * 1024 + 1}
        }}});
        let mut c = base();
        size_pod(&mut c, &spec).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (3, 256 + 101));
        // Unlimited (-1) quota and no limit leave the defaults.
        let mut c = base();
        let spec = json!({"linux": {"resources": {"cpu": {"quota": -1, "period": 100000}}}});
        size_pod(&mut c, &spec).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (1, 256));
        // Annotations win.
        let mut c = base();
        let spec = json!({
            "linux": {"resources": {"memory": {"limit": 1 << 30}}},
            "annotations": {"io.husk.vcpus": "2", "io.husk.memory_mib": "384"}
        });
        size_pod(&mut c, &spec).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 384));
        for (k, v) in [
            ("io.husk.vcpus", "0"),
            ("io.husk.vcpus", "300"),
            ("io.husk.vcpus", "many"),
            ("io.husk.memory_mib", "8"),
        ] {
            let e = size_pod(&mut base(), &json!({"annotations": {k: v}})).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
    }

    #[test]
    fn cri_pods_are_sized_from_containerds_sandbox_annotations() {
        // What containerd 1.6 puts on a pod's pause container: its own cpu
        // shares, and the sums of the pod's container limits.
        let spec = json!({
            "linux": {"resources": {"cpu": {"shares": 2}}},
            "annotations": {
                "io.kubernetes.cri.sandbox-cpu-period": "100000",
                "io.kubernetes.cri.sandbox-cpu-quota": "150000",
                "io.kubernetes.cri.sandbox-cpu-shares": "1536",
                "io.kubernetes.cri.sandbox-memory": "134217728",
            }
        });
        let mut c = base();
        size_pod(&mut c, &spec).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 256 + 128));
        // A pod without limits: containerd writes zeros.
        let spec = json!({"annotations": {
            "io.kubernetes.cri.sandbox-cpu-period": "0",
            "io.kubernetes.cri.sandbox-cpu-quota": "0",
            "io.kubernetes.cri.sandbox-memory": "0",
        }});
        let mut c = base();
        size_pod(&mut c, &spec).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (1, 256));
        // Both the sandbox container's own limit and the pod's are added.
        let spec = json!({
            "linux": {"resources": {"memory": {"limit": 64 << 20}}},
            "annotations": {"io.kubernetes.cri.sandbox-memory": "33554432"}
        });
        let mut c = base();
        size_pod(&mut c, &spec).unwrap();
        assert_eq!(c.memory_mib, 256 + 64 + 32);
        for (k, v) in [
            ("io.kubernetes.cri.sandbox-memory", "lots"),
            ("io.kubernetes.cri.sandbox-cpu-quota", "1.5"),
            ("io.husk.vcpus", "-2"),
        ] {
            let e = size_pod(&mut base(), &json!({"annotations": {k: v}})).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
    }

    #[test]
    fn runtime_options_give_the_config_path() {
        use containerd_shim::protos::protobuf::CodedOutputStream;
        let mut value = Vec::new();
        {
            let mut os = CodedOutputStream::vec(&mut value);
            os.write_string(1, "io.containerd.husk.v1.Config").unwrap();
            os.write_string(2, "/etc/husk/other.toml").unwrap();
            os.write_string(3, "body").unwrap();
            os.flush().unwrap();
        }
        assert_eq!(
            options_config_path("runtimeoptions.v1.Options", &value).as_deref(),
            Some("/etc/husk/other.toml")
        );
        assert_eq!(
            options_config_path("containerd.runc.v1.Options", &value),
            None
        );
        assert_eq!(options_config_path("runtimeoptions.v1.Options", &[]), None);
        assert_eq!(
            options_config_path("runtimeoptions.v1.Options", &[0x12, 0x50]),
            None
        );
    }
}
