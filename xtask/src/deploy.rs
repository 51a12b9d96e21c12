//! The Kubernetes manifests and the container recipe in deploy/: validated against the API's
//! schemas of the Kubernetes version the project targets, offline, by `kubernetes-validate`
//! (PyPI, pinned, in a virtual environment of its own); and the recipe held to the pins.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::{cmd, root, run};

/// `kubernetes-validate` and everything it imports, pinned: a fresh machine validates with
/// exactly what CI validated with. It carries the API's JSON schemas for every Kubernetes
/// version it knows, so it runs offline.
pub const KUBERNETES_VALIDATE: &[(&str, &str)] = &[
    ("kubernetes-validate", "1.37.0"),
    ("attrs", "26.1.0"),
    ("importlib-resources", "7.1.0"),
    ("jsonschema", "4.26.0"),
    ("jsonschema-specifications", "2025.9.1"),
    ("packaging", "26.4"),
    ("pyyaml", "6.0.4"),
    ("referencing", "0.37.0"),
    ("rpds-py", "2026.9.1"),
    ("typing-extensions", "4.16.0"),
];

/// Debian's own Python (the `python3-venv` package), not whatever `python3` a user's PATH finds.
const PYTHON: &str = "/usr/bin/python3";

/// Where the virtual environment lives: the user's cache, outside `target/` so that `cargo
/// clean` does not cost a reinstall, and named by the pinned version.
fn venv() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set: no place for the validator's venv")?;
    let version = KUBERNETES_VALIDATE[0].1;
    Ok(cache.join(format!("xdns/kubernetes-validate-{version}")))
}

/// `name==version` lines as `pip freeze` prints them, normalised (PEP 503 names), sorted.
fn normalised(lines: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = lines
        .filter_map(|l| {
            let (name, version) = l.trim().split_once("==")?;
            Some(format!(
                "{}=={version}",
                name.to_ascii_lowercase().replace(['_', '.'], "-")
            ))
        })
        .collect();
    v.sort();
    v
}

fn pinned() -> Vec<String> {
    normalised(
        KUBERNETES_VALIDATE
            .iter()
            .map(|(name, version)| format!("{name}=={version}")),
    )
}

/// What the venv holds now, if it is usable at all.
fn installed(venv: &Path) -> Option<Vec<String>> {
    let out = Command::new(venv.join("bin/pip"))
        .args([
            "freeze",
            "--all",
            "--exclude",
            "pip",
            "--exclude",
            "setuptools",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(normalised(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string),
    ))
}

/// Installs the pinned validator into its venv, unless it is there already.
pub fn setup_kubernetes_validate() -> anyhow::Result<()> {
    let venv = venv()?;
    let pinned = pinned();
    match installed(&venv) {
        Some(have) if have == pinned => {
            println!(
                "setup: kubernetes-validate {} present ({})",
                KUBERNETES_VALIDATE[0].1,
                venv.display()
            );
            return Ok(());
        }
        Some(have) => println!(
            "setup: {} holds {have:?}; reinstalling the pinned set",
            venv.display()
        ),
        None => println!(
            "setup: installing kubernetes-validate {} into {}",
            KUBERNETES_VALIDATE[0].1,
            venv.display()
        ),
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    run(cmd(PYTHON).args(["-m", "venv"]).arg(&venv)).context(
        "making the validator's Python venv (Debian: `apt-get install python3-venv`, which \
         `cargo xtask setup` installs)",
    )?;
    // No dependency resolution: exactly the pinned set, every one of them listed.
    run(cmd(venv.join("bin/pip").to_str().context("venv path")?)
        .args([
            "install",
            "--quiet",
            "--no-deps",
            "--require-virtualenv",
            "--disable-pip-version-check",
        ])
        .args(KUBERNETES_VALIDATE.iter().map(|(n, v)| format!("{n}=={v}"))))
    .context("installing kubernetes-validate from PyPI")?;
    let have = installed(&venv).context("the new venv's pip does not run")?;
    if have != pinned {
        bail!(
            "{} holds {have:?} after the install, not the pinned {pinned:?}",
            venv.display()
        );
    }
    Ok(())
}

/// The Kubernetes minor version the project targets: k8s-openapi's `v1_NN` feature in the
/// workspace's Cargo.toml (the API the agent is built against).
pub fn kubernetes_version(cargo_toml: &str) -> anyhow::Result<String> {
    let line = cargo_toml
        .lines()
        .find(|l| l.trim_start().starts_with("k8s-openapi"))
        .context("no k8s-openapi dependency in the workspace's Cargo.toml")?;
    let feature = line
        .split('"')
        .find_map(|w| w.strip_prefix("v1_"))
        .context("k8s-openapi has no v1_NN feature in the workspace's Cargo.toml")?;
    let minor: u32 = feature
        .parse()
        .with_context(|| format!("k8s-openapi feature v1_{feature} is not v1_NN"))?;
    Ok(format!("1.{minor}"))
}

/// Every manifest of deploy/ and deploy/examples/.
fn manifests() -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for dir in ["deploy", "deploy/examples"] {
        for entry in std::fs::read_dir(root().join(dir)).with_context(|| dir.to_string())? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Validates deploy/*.yaml and deploy/examples/*.yaml against the schemas of the targeted
/// Kubernetes version, strictly (an unknown field is an error), in a network namespace with no
/// network at all: it must not need one. Fails on the first invalid manifest.
pub fn validate_manifests() -> anyhow::Result<()> {
    let version = kubernetes_version(&std::fs::read_to_string(root().join("Cargo.toml"))?)?;
    let files = manifests()?;
    if files.is_empty() {
        bail!("no manifests found in deploy/");
    }
    let validator = venv()?.join("bin/kubernetes-validate");
    run(cmd("unshare")
        .args(["--net", "--"])
        .arg(&validator)
        .args(["--strict", "--quiet", "--kubernetes-version", &version])
        .args(&files))
    .with_context(|| {
        format!("the manifests do not validate against Kubernetes {version} (see above)")
    })?;
    println!(
        "manifests: {} files valid against Kubernetes {version}",
        files.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targeted_kubernetes_version_is_k8s_openapis() {
        let toml = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
        let version = kubernetes_version(&toml).unwrap();
        assert!(toml.contains(&format!("\"v1_{}\"", &version[2..])));
        assert_eq!(
            kubernetes_version(
                r#"k8s-openapi = { version = "0.29", features = ["std", "v1_33"] }"#
            )
            .unwrap(),
            "1.33"
        );
        assert!(kubernetes_version("k8s-openapi = \"0.29\"").is_err());
    }

    #[test]
    fn pins_compare_as_pip_freeze_prints_them() {
        let freeze = ["PyYAML==6.0.4", "typing_extensions==4.16.0", "pip==23.0.1"]
            .map(String::from)
            .into_iter();
        assert_eq!(
            normalised(freeze),
            ["pip==23.0.1", "pyyaml==6.0.4", "typing-extensions==4.16.0"]
        );
        assert_eq!(pinned().len(), KUBERNETES_VALIDATE.len());
    }

    /// The recipe builds with the pinned toolchains: the base image's Rust is
    /// rust-toolchain.toml's, setup installs the rest, and the runtime image is the build
    /// image's Debian (the binary links against its glibc).
    #[test]
    fn containerfile_follows_the_pins() {
        let recipe = std::fs::read_to_string(root().join("deploy/Containerfile")).unwrap();
        let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
        let channel = toolchain
            .lines()
            .find_map(|l| l.trim().strip_prefix("channel"))
            .and_then(|l| l.split('"').nth(1))
            .expect("rust-toolchain.toml names a channel");

        let froms: Vec<Vec<&str>> = recipe
            .lines()
            .filter_map(|l| l.strip_prefix("FROM "))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            froms.len(),
            2,
            "a build stage and a runtime stage: {froms:?}"
        );
        let (build, runtime) = (&froms[0], &froms[1]);
        let (image, tag) = build[0].rsplit_once(':').expect("a tagged build image");
        assert_eq!(image, "docker.io/library/rust");
        let (rust, debian) = tag.split_once('-').expect("rust:<version>-<debian>");
        assert_eq!(
            rust, channel,
            "the build image's Rust is rust-toolchain.toml's channel"
        );
        assert_eq!(
            runtime[0],
            format!("docker.io/library/debian:{debian}-slim"),
            "the runtime image is the build image's Debian"
        );

        let build_stage: String = recipe
            .split("\nFROM ")
            .nth(1)
            .expect("a build stage")
            .to_string();
        let steps: Vec<&str> = build_stage
            .split("&&")
            .flat_map(|s| s.split('\n'))
            .map(|s| {
                s.trim()
                    .trim_start_matches("RUN ")
                    .trim_end_matches('\\')
                    .trim()
            })
            .collect();
        for step in [
            "cargo xtask setup --build-only",
            "cargo build --locked --release -p dns-agent",
        ] {
            assert!(
                steps.contains(&step),
                "the build stage runs `{step}`: {steps:?}"
            );
        }
        assert!(
            recipe.contains("COPY --from=build /src/target/release/dns-agent "),
            "the runtime image takes the binary the build stage made"
        );

        // `COPY . .` takes the build context: without an ignore file, a developer's target/.
        let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
        assert!(ignore.lines().any(|l| l.trim() == "target"));
    }
}
