//! Debian kernel packages for the VM legs: found and fetched through an APT configuration of
//! the project's own (its own sources list, lists, cache and an empty dpkg status: the system's
//! APT setup is never read or changed), unpacked once per kernel under the cache directory.
use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{status, step};

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";
/// Where Debian's kernels for each release live: 5.10 (bullseye, its updates in
/// bullseye-security), 6.1 (bookworm), 6.12 (trixie), the newest (trixie-backports).
const SUITES: &[(&str, &str)] = &[
    (MIRROR, "bullseye"),
    (SECURITY, "bullseye-security"),
    (MIRROR, "bookworm"),
    (SECURITY, "bookworm-security"),
    (MIRROR, "trixie"),
    (SECURITY, "trixie-security"),
    (MIRROR, "trixie-backports"),
];
/// Package lists older than this are fetched again.
const LISTS_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Module trees a VM without hardware never loads (under lib/modules/RELEASE/kernel),
/// deleted after unpacking: two thirds of a kernel package (~200 of ~320 MB on 5.10), which
/// keeps the CI leg's cache small. What the guest loads (virtio, 9p, overlay, netfilter,
/// veth, tun, sch_*) stays.
const UNUSED_MODULES: &[&str] = &[
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/scsi",
    "drivers/usb",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/iio",
    "drivers/hwmon",
    "drivers/input",
    "drivers/hid",
    "drivers/isdn",
    "drivers/mtd",
    "drivers/video",
    "drivers/platform",
    "drivers/mmc",
    "drivers/ata",
    "drivers/nvme",
    "drivers/bluetooth",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "drivers/net/usb",
    "drivers/net/can",
    "net/bluetooth",
    "net/wireless",
    "net/mac80211",
];

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    /// `uname -r` of the kernel, e.g. 5.10.0-46-amd64.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// lib/modules/RELEASE with modules.dep.
    pub modules: PathBuf,
    pub dir: PathBuf,
}

/// The project's own APT state under `cache/apt`.
pub(crate) struct Apt {
    dir: PathBuf,
}

impl Apt {
    pub(crate) fn new(cache: &Path) -> anyhow::Result<Self> {
        let dir = cache.join("apt");
        for d in [
            "lists/partial",
            "cache/archives/partial",
            "etc/sources.list.d",
            "etc/apt.conf.d",
            "etc/preferences.d",
        ] {
            fs::create_dir_all(dir.join(d))?;
        }
        let sources: String = SUITES
            .iter()
            .map(|(uri, suite)| format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"))
            .collect();
        fs::write(dir.join("etc/sources.list"), sources)?;
        // An empty dpkg status: this configuration only downloads, it never installs.
        fs::write(dir.join("status"), "")?;
        let d = dir.display();
        fs::write(
            dir.join("apt.conf"),
            format!(
                "Dir::Etc::SourceList \"{d}/etc/sources.list\";\n\
                 Dir::Etc::SourceParts \"{d}/etc/sources.list.d\";\n\
                 Dir::Etc::Parts \"{d}/etc/apt.conf.d\";\n\
                 Dir::Etc::Preferences \"{d}/etc/preferences\";\n\
                 Dir::Etc::PreferencesParts \"{d}/etc/preferences.d\";\n\
                 Dir::State::Lists \"{d}/lists\";\n\
                 Dir::State::status \"{d}/status\";\n\
                 Dir::Cache \"{d}/cache\";\n\
                 Dir::Cache::pkgcache \"\";\n\
                 Dir::Cache::srcpkgcache \"\";\n\
                 Acquire::Languages \"none\";\n\
                 Acquire::GzipIndexes \"true\";\n\
                 Acquire::CompressionTypes::Order:: \"gz\";\n\
                 Acquire::Check-Valid-Until \"false\";\n\
                 Acquire::Retries \"3\";\n\
                 APT::Sandbox::User \"root\";\n"
            ),
        )?;
        Ok(Self { dir })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", self.dir.join("apt.conf"))
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn lists_fresh(&self) -> bool {
        let Ok(entries) = fs::read_dir(self.dir.join("lists")) else {
            return false;
        };
        let newest = entries
            .flatten()
            // Stored compressed (Packages.lz4, .gz): a name that ends in "_Packages" alone
            // never matched, and every run fetched the lists again.
            .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max();
        newest.is_some_and(|t| {
            SystemTime::now()
                .duration_since(t)
                .is_ok_and(|age| age < LISTS_MAX_AGE)
        })
    }

    pub(crate) fn update(&self, force: bool) -> anyhow::Result<()> {
        if !force && self.lists_fresh() {
            return Ok(());
        }
        step("kernel package lists: apt-get update (the project's own APT_CONFIG)");
        status(self.cmd("apt-get").arg("update").stdout(Stdio::null()))
    }

    fn output(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .cmd(program)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .with_context(|| format!("cannot start {program}"))?;
        if !out.status.success() {
            bail!("{program} {} failed ({})", args.join(" "), out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every complete amd64 kernel in the lists (no cloud/rt flavours).
    pub(crate) fn candidates(&self) -> anyhow::Result<Vec<Candidate>> {
        let names = self.output(
            "apt-cache",
            &[
                "search",
                "--names-only",
                "^linux-(image|binary|modules|base)-[0-9][^ ]*-amd64$",
            ],
        )?;
        let mut images = BTreeSet::new();
        let mut binaries = BTreeSet::new();
        let mut modules = BTreeSet::new();
        let mut bases = BTreeSet::new();
        for name in names.lines().filter_map(|l| l.split_whitespace().next()) {
            for (prefix, set) in [
                ("linux-image-", &mut images),
                ("linux-binary-", &mut binaries),
                ("linux-modules-", &mut modules),
                ("linux-base-", &mut bases),
            ] {
                if let Some(release) = name.strip_prefix(prefix)
                    && !release.ends_with("-cloud-amd64")
                    && !release.ends_with("-rt-amd64")
                {
                    set.insert(release.to_string());
                }
            }
        }
        let mut packages: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for release in &images {
            // From 6.19 linux-image-X only depends on linux-binary-X (the kernel),
            // linux-modules-X and linux-base-X; some of those releases have no modules package.
            let pkgs = if binaries.contains(release) {
                if !modules.contains(release) {
                    continue;
                }
                let mut p = vec![
                    format!("linux-binary-{release}"),
                    format!("linux-modules-{release}"),
                ];
                // modules.builtin: what modprobe must not look for (virtio_pci is built in).
                if bases.contains(release) {
                    p.push(format!("linux-base-{release}"));
                }
                p
            } else {
                vec![format!("linux-image-{release}")]
            };
            packages.insert(release.clone(), pkgs);
        }
        let first: Vec<String> = packages.values().map(|p| p[0].clone()).collect();
        let mut args = vec!["show", "--no-all-versions"];
        args.extend(first.iter().map(String::as_str));
        let versions = parse_versions(&self.output("apt-cache", &args)?);
        Ok(packages
            .into_iter()
            .filter_map(|(release, packages)| {
                let version = versions.get(&packages[0])?.clone();
                Some(Candidate {
                    release,
                    version,
                    packages,
                })
            })
            .collect())
    }

    fn download(&self, packages: &[String], into: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(into)?;
        status(
            self.cmd("apt-get")
                .arg("download")
                .args(packages)
                .current_dir(into)
                .stdout(Stdio::null()),
        )
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub release: String,
    pub version: String,
    pub packages: Vec<String>,
}

fn parse_versions(show: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stanza in show.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        if let (Some(p), Some(v)) = (field("Package"), field("Version")) {
            out.insert(p, v);
        }
    }
    out
}

/// The kernel a `--kernel` spec names: `newest`, a series (`5.10`, `6.12`: its newest Debian
/// build) or an exact release (`6.12.118+deb13-amd64`).
pub(crate) fn select<'a>(candidates: &'a [Candidate], spec: &str) -> Option<&'a Candidate> {
    let matches = |c: &&Candidate| match spec {
        "newest" | "latest" => true,
        s if s.ends_with("-amd64") => c.release == s,
        s => c.release.starts_with(&format!("{s}.")) || c.release.starts_with(&format!("{s}-")),
    };
    candidates
        .iter()
        .filter(matches)
        .max_by(|a, b| debian_version_cmp(&a.version, &b.version))
}

/// dpkg's version order (epoch, then upstream and revision compared with `~` lowest).
pub(crate) fn debian_version_cmp(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: Option<char>) -> i32 {
        match c {
            Some('~') => -1,
            None => 0,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    fn part(mut a: &str, mut b: &str) -> Ordering {
        while !a.is_empty() || !b.is_empty() {
            let na = a.find(|c: char| c.is_ascii_digit()).unwrap_or(a.len());
            let nb = b.find(|c: char| c.is_ascii_digit()).unwrap_or(b.len());
            let (mut sa, mut sb) = (a[..na].chars(), b[..nb].chars());
            loop {
                let (ca, cb) = (sa.next(), sb.next());
                if ca.is_none() && cb.is_none() {
                    break;
                }
                match order(ca).cmp(&order(cb)) {
                    Ordering::Equal => {}
                    o => return o,
                }
            }
            a = &a[na..];
            b = &b[nb..];
            let da = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
            let db = b.find(|c: char| !c.is_ascii_digit()).unwrap_or(b.len());
            let va: u64 = a[..da].parse().unwrap_or(0);
            let vb: u64 = b[..db].parse().unwrap_or(0);
            match va.cmp(&vb) {
                Ordering::Equal => {}
                o => return o,
            }
            a = &a[da..];
            b = &b[db..];
        }
        Ordering::Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| part(ua, ub))
        .then_with(|| part(ra, rb))
}

/// Downloads and unpacks `c` under `cache/kernels/RELEASE` (once), with modules.dep built.
pub(crate) fn prepare(apt: &Apt, cache: &Path, c: &Candidate) -> anyhow::Result<Kernel> {
    let dir = cache.join("kernels").join(&c.release);
    let ready = dir.join("ready");
    let kernel = Kernel {
        release: c.release.clone(),
        vmlinuz: dir.join(format!("root/boot/vmlinuz-{}", c.release)),
        modules: dir.join(format!("root/lib/modules/{}", c.release)),
        dir: dir.clone(),
    };
    // The version, and how the tree was cut (a tree unpacked before UNUSED_MODULES is
    // unpacked again).
    let stamp = format!("{} without-unused-modules", c.version);
    if fs::read_to_string(&ready).is_ok_and(|v| v.trim() == stamp) {
        step(&format!("kernel {} ({}): cached", c.release, c.version));
        return Ok(kernel);
    }
    let _ = fs::remove_dir_all(&dir);
    let debs = dir.join("debs");
    step(&format!(
        "kernel {} ({}): apt-get download {}",
        c.release,
        c.version,
        c.packages.join(" ")
    ));
    apt.download(&c.packages, &debs)?;
    let root = dir.join("root");
    for deb in fs::read_dir(&debs)?.flatten() {
        status(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb.path())
                .arg(&root),
        )?;
    }
    // trixie and later ship modules under /usr/lib/modules.
    let usr = root.join(format!("usr/lib/modules/{}", c.release));
    if usr.is_dir() && !kernel.modules.exists() {
        fs::create_dir_all(root.join("lib/modules"))?;
        fs::rename(&usr, &kernel.modules)?;
    }
    // From 6.19 the kernel image sits next to its modules.
    let in_modules = kernel.modules.join("vmlinuz");
    if !kernel.vmlinuz.is_file() && in_modules.is_file() {
        fs::create_dir_all(root.join("boot"))?;
        fs::rename(&in_modules, &kernel.vmlinuz)?;
    }
    if !kernel.vmlinuz.is_file() || !kernel.modules.is_dir() {
        bail!(
            "{}: no boot/vmlinuz-{} or lib/modules/{} in {}",
            c.release,
            c.release,
            c.release,
            c.packages.join(", ")
        );
    }
    for unused in UNUSED_MODULES {
        let d = kernel.modules.join("kernel").join(unused);
        if d.is_dir() {
            fs::remove_dir_all(&d).with_context(|| d.display().to_string())?;
        }
    }
    status(
        Command::new(crate::setup::sbin("depmod"))
            .arg("-b")
            .arg(&root)
            .arg(&c.release),
    )?;
    fs::remove_dir_all(&debs)?;
    fs::write(&ready, &stamp)?;
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_order_like_dpkg() {
        use Ordering::*;
        for (a, b, o) in [
            ("6.1.192-3", "6.1.170-1~deb11u1", Greater),
            ("6.12.118-1", "6.12.117-1", Greater),
            ("7.3.4-1~bpo13+1", "7.3.4-1", Less),
            ("1:1.0", "2.0", Greater),
            ("5.10.262-1", "5.10.262-1", Equal),
            ("6.1.0~rc1-1", "6.1.0-1", Less),
        ] {
            assert_eq!(debian_version_cmp(a, b), o, "{a} vs {b}");
        }
    }

    fn cand(release: &str, version: &str) -> Candidate {
        Candidate {
            release: release.into(),
            version: version.into(),
            packages: vec![format!("linux-image-{release}")],
        }
    }

    #[test]
    fn a_series_selects_its_newest_build_and_not_a_longer_series() {
        let c = vec![
            cand("6.1.0-56-amd64", "6.1.190-1"),
            cand("6.1.0-57-amd64", "6.1.192-3"),
            cand("6.1.0-0.deb11.52-amd64", "6.1.170-1~deb11u1"),
            cand("6.12.118+deb13-amd64", "6.12.118-1"),
            cand("7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
            cand("5.10.0-46-amd64", "5.10.262-1"),
        ];
        assert_eq!(select(&c, "6.1").unwrap().release, "6.1.0-57-amd64");
        assert_eq!(select(&c, "6.12").unwrap().release, "6.12.118+deb13-amd64");
        assert_eq!(select(&c, "5.10").unwrap().release, "5.10.0-46-amd64");
        assert_eq!(select(&c, "newest").unwrap().release, "7.3.4+deb13-amd64");
        assert_eq!(
            select(&c, "6.1.0-56-amd64").unwrap().release,
            "6.1.0-56-amd64"
        );
        assert!(select(&c, "5.15").is_none());
    }

    #[test]
    fn versions_from_apt_cache_show() {
        let show = "Package: linux-image-5.10.0-46-amd64\nSource: linux-signed-amd64\nVersion: 5.10.262-1\n\nPackage: linux-binary-7.3.4+deb13-amd64\nVersion: 7.3.4-1~bpo13+1\n";
        let v = parse_versions(show);
        assert_eq!(v["linux-image-5.10.0-46-amd64"], "5.10.262-1");
        assert_eq!(v["linux-binary-7.3.4+deb13-amd64"], "7.3.4-1~bpo13+1");
    }
}
