//! Debian packages of another architecture (`vexec kernel fetch --arch`, a
//! foreign guest's busybox), downloaded through vexec's own apt
//! configuration: the host's Debian sources, its own package lists and
//! cache under vexec's cache directory, an empty dpkg status. The host's
//! dpkg and apt state is never read for packages nor written.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{StoreError, io};

/// One `deb` source of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub signed_by: Option<String>,
}

/// The host's enabled `deb` sources under `etc_apt` (/etc/apt):
/// sources.list, sources.list.d/*.list and deb822 sources.list.d/*.sources.
pub fn host_sources(etc_apt: &Path) -> Vec<Source> {
    let mut files = vec![etc_apt.join("sources.list")];
    let mut parts: Vec<PathBuf> = std::fs::read_dir(etc_apt.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    parts.sort();
    files.extend(parts);
    let mut found = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => found.extend(parse_deb822(&text)),
            Some("list") => found.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    found
}

/// `deb [options] URI SUITE COMPONENT...` lines.
fn parse_one_line(text: &str) -> Vec<Source> {
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_string);
            rest = after.trim_start();
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.len() >= 3 {
            found.push(Source {
                uri: words[0].to_string(),
                suites: vec![words[1].to_string()],
                components: words[2..].iter().map(|w| w.to_string()).collect(),
                signed_by,
            });
        }
    }
    found
}

/// deb822 stanzas (`Types: deb`, `URIs:`, `Suites:`, `Components:`,
/// `Signed-By:` as a path, `Enabled: no` skipped).
fn parse_deb822(text: &str) -> Vec<Source> {
    let mut found = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let words = |name: &str| -> Vec<String> {
            field(name)
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        if !words("Types").iter().any(|t| t == "deb")
            || field("Enabled").is_some_and(|e| e.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        // An inline key (several lines) is not a path apt can be told.
        let signed_by = field("Signed-By").filter(|s| s.starts_with('/'));
        for uri in words("URIs") {
            found.push(Source {
                uri,
                suites: words("Suites"),
                components: words("Components"),
                signed_by: signed_by.clone(),
            });
        }
    }
    found
}

/// A private apt for Debian architecture `arch` (arm64, amd64...).
pub struct PrivateApt {
    dir: PathBuf,
    arch: String,
}

impl PrivateApt {
    /// Lays out `dir` with the host's sources restricted to `arch`.
    pub fn new(dir: &Path, arch: &str, sources: &[Source]) -> Result<PrivateApt, StoreError> {
        if sources.is_empty() {
            return Err(StoreError::Tool {
                what: "finding the host's apt sources".into(),
                detail: "no `deb` source in /etc/apt (sources.list, sources.list.d); vexec fetches packages of another architecture from the archive the host uses".into(),
            });
        }
        for d in ["lists/partial", "cache/archives/partial", "etc"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(io(format!("creating {}", p.display())))?;
        }
        let mut list = String::new();
        for s in sources {
            let key = (s.signed_by.as_ref()).map_or(String::new(), |k| format!(" signed-by={k}"));
            for suite in &s.suites {
                list.push_str(&format!(
                    "deb [arch={arch}{key}] {} {suite} {}\n",
                    s.uri,
                    s.components.join(" ")
                ));
            }
        }
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(io(format!("writing {}", p.display())))
        };
        write("etc/sources.list", &list)?;
        write("status", "")?;
        Ok(PrivateApt {
            dir: dir.to_path_buf(),
            arch: arch.to_string(),
        })
    }

    fn apt(&self, program: &str) -> Command {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut c = Command::new(program);
        let mut opt = |o: String| {
            c.arg("-o").arg(o);
        };
        opt(format!("Dir::Etc::SourceList={}", d("etc/sources.list")));
        opt("Dir::Etc::SourceParts=-".into());
        opt(format!("Dir::Etc::Parts={}", d("etc")));
        opt(format!("Dir::Etc::PreferencesParts={}", d("etc")));
        opt(format!("Dir::State::Lists={}", d("lists")));
        opt(format!("Dir::State::status={}", d("status")));
        opt(format!("Dir::Cache={}", d("cache")));
        opt(format!("APT::Architecture={}", self.arch));
        opt(format!("APT::Architectures::={}", self.arch));
        opt("Debug::NoLocking=1".into());
        // As root apt would hand downloads to _apt, who cannot write here.
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            opt("APT::Sandbox::User=root".into());
        }
        c.stdin(Stdio::null());
        c
    }

    /// Downloads the package lists.
    pub fn update(&self) -> Result<(), StoreError> {
        crate::say!("vexec: reading the package lists for {}...", self.arch);
        super::run(
            self.apt("apt-get").args(["-q", "update"]),
            "apt-get update (private, for another architecture)",
        )
    }

    /// Downloads `package` of this architecture into `into`; returns the .deb.
    pub fn download(&self, package: &str, into: &Path) -> Result<PathBuf, StoreError> {
        let name = format!("{package}:{}", self.arch);
        crate::say!("vexec: downloading {name} with apt-get...");
        let out = self
            .apt("apt-get")
            .args(["download", "-q", &name])
            .current_dir(into)
            .output()
            .map_err(io(
                "running apt-get (fetching another architecture needs apt)",
            ))?;
        if !out.status.success() {
            return Err(StoreError::Tool {
                what: format!("apt-get download {name}"),
                detail: String::from_utf8_lossy(&out.stderr).trim().into(),
            });
        }
        super::find_deb(into, &name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_sources_with_options_and_comments() {
        let text = "# comment\n\
            deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://m.example/debian bookworm main contrib\n\
            deb-src http://m.example/debian bookworm main\n\
            deb http://m.example/debian-security bookworm-security main # trailing\n\
            deb broken\n";
        let s = parse_one_line(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].uri, "http://m.example/debian");
        assert_eq!(s[0].components, ["main", "contrib"]);
        assert_eq!(s[0].signed_by.as_deref(), Some("/usr/share/keyrings/k.gpg"));
        assert_eq!(s[1].suites, ["bookworm-security"]);
        assert_eq!(s[1].signed_by, None);
    }

    #[test]
    fn deb822_stanzas_skip_disabled_and_source_only_ones() {
        let text = "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm bookworm-updates\n\
            Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
            Types: deb-src\nURIs: http://m.example/debian\nSuites: bookworm\nComponents: main\n\n\
            Types: deb\nEnabled: no\nURIs: http://other.example/x\nSuites: y\nComponents: main\n";
        let s = parse_deb822(text);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(
            s[0].signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
    }

    #[test]
    fn the_private_list_is_restricted_to_the_architecture() {
        let d = tempfile::tempdir().unwrap();
        let sources =
            parse_one_line("deb [signed-by=/k.gpg] http://m.example/debian bookworm main\n");
        PrivateApt::new(d.path(), "arm64", &sources).unwrap();
        let list = std::fs::read_to_string(d.path().join("etc/sources.list")).unwrap();
        assert_eq!(
            list,
            "deb [arch=arm64 signed-by=/k.gpg] http://m.example/debian bookworm main\n"
        );
        assert!(PrivateApt::new(d.path(), "arm64", &[]).is_err());
    }
}
