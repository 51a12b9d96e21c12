//! How the XDP program (`dns-ebpf`) is built, in one place: the pinned toolchain, the check that
//! its LLVM is bpf-linker's, and the build command. The agent's build script uses it to build
//! the object it embeds; `cargo xtask` uses it to set a machine up, build the object alone,
//! lint it and benchmark it.
//!
//! The toolchain is named once, in `dns-ebpf/rust-toolchain.toml`. bpf-linker links the LLVM
//! bitcode rustc emits, and LLVM reads bitcode only from its own major version or older: a
//! rustc with a newer LLVM than bpf-linker's fails deep in the link with `Invalid record`. So
//! the channel is a dated nightly whose LLVM major is [`LLVM_MAJOR`], bpf-linker is built
//! against that major, and [`check_llvm`] compares the two before every build.

use std::{
    ffi::OsStr,
    fmt, fs, io,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The LLVM major the XDP toolchain, bpf-linker and Debian's `llvm-N-dev` share.
pub const LLVM_MAJOR: u32 = 22;
/// The bpf-linker release `cargo xtask setup` installs (built against [`LLVM_MAJOR`]).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// The target of the XDP program.
pub const TARGET: &str = "bpfel-unknown-none";
/// What fixes a machine whose tools do not match the pins.
pub const FIX: &str = "cargo xtask setup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    ToolchainFile { path: PathBuf, reason: String },
    #[error("running `{command}` failed ({source}); {hint}")]
    Spawn {
        command: String,
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("the XDP toolchain {channel} is not installed (or has no rust-src): run `{FIX}`")]
    ToolchainMissing { channel: String },
    #[error("bpf-linker is not installed (not on PATH): run `{FIX}`")]
    LinkerMissing,
    #[error("could not tell the LLVM version of {what}: {output}")]
    UnknownLlvm { what: String, output: String },
    #[error(
        "LLVM mismatch: the XDP toolchain {channel} has LLVM {rustc} but bpf-linker ({linker_path}) \
         has LLVM {linker}; both must be LLVM {LLVM_MAJOR}: {fix}"
    )]
    LlvmMismatch {
        channel: String,
        rustc: u32,
        linker: u32,
        linker_path: String,
        fix: String,
    },
    #[error("building the XDP program failed ({status}){output}; `{FIX}` installs what it needs")]
    Build { status: String, output: String },
    #[error("the XDP build produced no object in {0}")]
    NoObject(PathBuf),
}

/// The workspace root (this crate is one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("dns-ebpf-build lives in the workspace")
        .to_path_buf()
}

/// The file that names the XDP toolchain.
pub fn toolchain_file() -> PathBuf {
    workspace_root().join("dns-ebpf/rust-toolchain.toml")
}

/// The XDP program's toolchain, as `dns-ebpf/rust-toolchain.toml` pins it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Toolchain {
    /// A dated nightly, e.g. `nightly-2026-05-19`.
    pub channel: String,
    /// Components it needs besides the compiler (`rust-src` for `-Z build-std`).
    pub components: Vec<String>,
}

impl fmt::Display for Toolchain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.channel)
    }
}

#[derive(serde::Deserialize)]
struct ToolchainFile {
    toolchain: ToolchainSection,
}

#[derive(serde::Deserialize)]
struct ToolchainSection {
    channel: String,
    #[serde(default)]
    components: Vec<String>,
}

impl Toolchain {
    /// Reads the pinned toolchain.
    pub fn pinned() -> Result<Self, Error> {
        let path = toolchain_file();
        let text = fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| Error::ToolchainFile { path, reason })
    }

    /// Parses a `rust-toolchain.toml`; refuses a floating channel.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ToolchainFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let channel = file.toolchain.channel;
        if !is_dated_nightly(&channel) {
            return Err(format!(
                "toolchain.channel = {channel:?}: the XDP toolchain must be a dated nightly \
                 (nightly-YYYY-MM-DD) whose LLVM is {LLVM_MAJOR}: a floating channel moves to a \
                 new LLVM that bpf-linker cannot read"
            ));
        }
        Ok(Self {
            channel,
            components: file.toolchain.components,
        })
    }

    /// `rustup run <channel> <program>`: the pinned toolchain whatever the caller's own is,
    /// with the variables an outer cargo sets for its compiler removed.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("rustup");
        c.args(["run", &self.channel, program]);
        for var in [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTUP_TOOLCHAIN",
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
        ] {
            c.env_remove(var);
        }
        c
    }

    /// `cargo` of the pinned toolchain, for the XDP program: release profile, its target, the
    /// core library built from source, and the flags aya's loader expects (BTF, debug info,
    /// the target architecture).
    pub fn cargo(&self, subcommand: &str, target_dir: &Path, arch: &str) -> Command {
        let mut c = self.command("cargo");
        c.current_dir(workspace_root())
            .args([subcommand, "--locked", "--package", "dns-ebpf", "--release"])
            .args(["--target", TARGET, "-Z", "build-std=core"])
            .arg("--target-dir")
            .arg(target_dir)
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
            );
        c
    }

    /// Is the toolchain installed with every component it needs?
    pub fn is_installed(&self) -> bool {
        let listed = Command::new("rustup")
            .args([
                "component",
                "list",
                "--installed",
                "--toolchain",
                &self.channel,
            ])
            .output();
        let Ok(out) = listed else { return false };
        if !out.status.success() {
            return false;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        self.components
            .iter()
            .all(|c| text.lines().any(|l| l.starts_with(c.as_str())))
    }

    /// The LLVM major of this toolchain's rustc.
    pub fn llvm_major(&self) -> Result<u32, Error> {
        let out = run(self.command("rustc").arg("-vV"), "`cargo xtask setup`")?;
        if !out.status.success() {
            return Err(Error::ToolchainMissing {
                channel: self.channel.clone(),
            });
        }
        let text = String::from_utf8_lossy(&out.stdout);
        llvm_major_of(&text).ok_or_else(|| Error::UnknownLlvm {
            what: format!("rustc {}", self.channel),
            output: text.trim().to_string(),
        })
    }
}

fn is_dated_nightly(channel: &str) -> bool {
    let Some(date) = channel.strip_prefix("nightly-") else {
        return false;
    };
    let b = date.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// The major of the first "LLVM version[:] N.M.P" in a tool's output (`rustc -vV` says
/// `LLVM version: 22.1.4`; LLVM's own `--version` says `Debian LLVM version 22.1.8`).
pub fn llvm_major_of(text: &str) -> Option<u32> {
    let at = text.find("LLVM version")?;
    let rest = text[at + "LLVM version".len()..].trim_start_matches([':', ' ']);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// bpf-linker on the PATH.
pub fn bpf_linker() -> Result<PathBuf, Error> {
    which::which("bpf-linker").map_err(|_| Error::LinkerMissing)
}

/// The LLVM major bpf-linker was built against: LLVM itself answers, through
/// `--llvm-args=--version` (it prints and exits before any input is read).
pub fn bpf_linker_llvm_major(linker: &Path) -> Result<u32, Error> {
    let probe = std::env::temp_dir().join(format!("xdns-llvm-probe-{}.o", std::process::id()));
    let out = run(
        Command::new(linker)
            .arg("--llvm-args=--version")
            .arg("-o")
            .arg(&probe)
            .arg("/dev/null"),
        "is bpf-linker installed? run `cargo xtask setup`",
    )?;
    let _ = fs::remove_file(&probe);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    llvm_major_of(&text).ok_or_else(|| Error::UnknownLlvm {
        what: format!("bpf-linker ({})", linker.display()),
        output: text.trim().to_string(),
    })
}

/// The version bpf-linker reports (`bpf-linker 0.13.0` → `0.13.0`).
pub fn bpf_linker_version(linker: &Path) -> Option<String> {
    let out = Command::new(linker).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_string)
}

/// Stops a build that would fail inside bpf-linker: both LLVM majors must be [`LLVM_MAJOR`].
pub fn check_llvm(toolchain: &Toolchain, linker: &Path) -> Result<(), Error> {
    let rustc = toolchain.llvm_major()?;
    let linker_major = bpf_linker_llvm_major(linker)?;
    if rustc != LLVM_MAJOR || linker_major != LLVM_MAJOR {
        let fix = if rustc == LLVM_MAJOR {
            format!(
                "run `{FIX}` (it installs bpf-linker {BPF_LINKER_VERSION} with LLVM {LLVM_MAJOR})"
            )
        } else {
            format!(
                "pin a nightly with LLVM {LLVM_MAJOR} in dns-ebpf/rust-toolchain.toml, or move \
                 LLVM_MAJOR and BPF_LINKER_VERSION (dns-ebpf-build) to LLVM {rustc} with it"
            )
        };
        return Err(Error::LlvmMismatch {
            channel: toolchain.channel.clone(),
            rustc,
            linker: linker_major,
            linker_path: linker.display().to_string(),
            fix,
        });
    }
    Ok(())
}

/// How to run the build's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildOutput {
    /// Shown as it comes (a developer building the object alone).
    Inherit,
    /// Kept, and shown in the error only if the build fails (the agent's build script, which
    /// otherwise would print a page of warnings on every build).
    OnFailure,
}

/// Builds every binary of `dns-ebpf` (the XDP program and the benchmark's reflector) into
/// `target_dir`, after checking the toolchain and bpf-linker. Returns the directory holding the
/// objects.
pub fn build(target_dir: &Path, arch: &str, output: BuildOutput) -> Result<PathBuf, Error> {
    let toolchain = Toolchain::pinned()?;
    if !toolchain.is_installed() {
        return Err(Error::ToolchainMissing {
            channel: toolchain.channel,
        });
    }
    check_llvm(&toolchain, &bpf_linker()?)?;
    let mut cargo = toolchain.cargo("build", target_dir, arch);
    cargo.arg("--bins");
    match output {
        BuildOutput::Inherit => {
            let status = cargo.status().map_err(|source| Error::Spawn {
                command: "rustup run cargo build".into(),
                hint: "is rustup installed?".into(),
                source,
            })?;
            if !status.success() {
                return Err(Error::Build {
                    status: status.to_string(),
                    output: String::new(),
                });
            }
        }
        BuildOutput::OnFailure => {
            let out = run(&mut cargo, "is rustup installed?")?;
            if !out.status.success() {
                return Err(Error::Build {
                    status: out.status.to_string(),
                    output: format!(":\n{}", String::from_utf8_lossy(&out.stderr)),
                });
            }
        }
    }
    let dir = target_dir.join(TARGET).join("release");
    if !dir.join("dns-ebpf").is_file() {
        return Err(Error::NoObject(dir));
    }
    Ok(dir)
}

/// The program objects of a build: the extensionless files of its release directory (not
/// cargo's hidden lock files).
pub fn objects(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
        if path.is_file() && path.extension().is_none() && !hidden {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn run(c: &mut Command, hint: &str) -> Result<Output, Error> {
    c.output().map_err(|source| Error::Spawn {
        command: describe(c),
        hint: hint.to_string(),
        source,
    })
}

fn describe(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_toolchain_is_a_dated_nightly() {
        let t = Toolchain::pinned().expect("dns-ebpf/rust-toolchain.toml");
        assert!(t.channel.starts_with("nightly-20"), "{t:?}");
        assert!(t.components.iter().any(|c| c == "rust-src"), "{t:?}");
    }

    #[test]
    fn a_floating_channel_is_refused_with_the_reason() {
        for channel in ["nightly", "stable", "beta", "nightly-2026", "1.95.0"] {
            let text = format!("[toolchain]\nchannel = \"{channel}\"\n");
            let err = Toolchain::parse(&text).expect_err(channel);
            assert!(err.contains("dated nightly"), "{channel}: {err}");
        }
        let ok = Toolchain::parse("[toolchain]\nchannel = \"nightly-2026-05-19\"\n").unwrap();
        assert_eq!(ok.channel, "nightly-2026-05-19");
        assert!(ok.components.is_empty());
    }

    #[test]
    fn llvm_majors_are_read_from_rustc_and_from_llvm() {
        let rustc = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                     release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major_of(rustc), Some(22));
        assert_eq!(
            llvm_major_of("Debian LLVM version 22.1.8\n  Optimized build.\n"),
            Some(22)
        );
        assert_eq!(
            llvm_major_of("LLVM (http://llvm.org/):\n  LLVM version 23.1.0\n"),
            Some(23)
        );
        assert_eq!(llvm_major_of("bpf-linker 0.13.0"), None);
    }

    #[test]
    fn a_mismatch_names_both_versions_and_the_fix_on_one_line() {
        let e = Error::LlvmMismatch {
            channel: "nightly-2026-10-29".into(),
            rustc: 23,
            linker: 22,
            linker_path: "/root/.cargo/bin/bpf-linker".into(),
            fix: "run `cargo xtask setup`".into(),
        }
        .to_string();
        assert!(!e.contains('\n'), "{e}");
        for part in [
            "LLVM 23",
            "LLVM 22",
            "nightly-2026-10-29",
            "cargo xtask setup",
        ] {
            assert!(e.contains(part), "{part} missing from: {e}");
        }
    }

    /// A bpf-linker built against another LLVM is caught before any build, from what LLVM
    /// itself prints: a stand-in linker that answers like an LLVM 23 build.
    #[test]
    fn a_linker_of_another_llvm_is_caught() {
        let dir = std::env::temp_dir().join(format!("xdns-fake-linker-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("bpf-linker");
        fs::write(
            &fake,
            "#!/bin/sh\necho 'LLVM (http://llvm.org/):'\necho '  LLVM version 23.1.0'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(bpf_linker_llvm_major(&fake).unwrap(), 23);
        fs::remove_dir_all(&dir).unwrap();
    }
}
