//! Reading a kernel's `.config` (from `/boot/config-REL`, a build tree, or
//! the image's embedded IKCONFIG).

use std::collections::HashMap;

/// How an option is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tristate {
    /// `=y`: built into the image.
    Yes,
    /// `=m`: a loadable module.
    Module,
    /// Unset or `is not set`.
    No,
}

/// A parsed kernel configuration.
#[derive(Debug, Clone, Default)]
pub struct KernelConfig {
    values: HashMap<String, String>,
}

impl KernelConfig {
    /// Parses `.config` text; comments other than `# X is not set` are ignored.
    pub fn parse(text: &str) -> Self {
        let values = text
            .lines()
            .filter_map(|line| {
                let (k, v) = line.trim().split_once('=')?;
                k.starts_with("CONFIG_")
                    .then(|| (k.to_string(), v.trim_matches('"').to_string()))
            })
            .collect();
        KernelConfig { values }
    }

    /// The state of `CONFIG_NAME` (pass the name with the `CONFIG_` prefix).
    pub fn get(&self, name: &str) -> Tristate {
        match self.values.get(name).map(String::as_str) {
            Some("y") => Tristate::Yes,
            Some("m") => Tristate::Module,
            _ => Tristate::No,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tristates() {
        let c = KernelConfig::parse(
            "# comment\nCONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_S=\"x y\"\n",
        );
        assert_eq!(c.get("CONFIG_A"), Tristate::Yes);
        assert_eq!(c.get("CONFIG_B"), Tristate::Module);
        assert_eq!(c.get("CONFIG_C"), Tristate::No);
        assert_eq!(c.get("CONFIG_D"), Tristate::No);
    }
}
