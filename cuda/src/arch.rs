//! GPU architectures as NVRTC and ptxas name them.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A compute capability such as sm_80 (A100) or sm_90 (H100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch(u32);

impl Arch {
    /// Ampere (A100).
    pub const SM80: Arch = Arch(80);
    /// Hopper (H100, H200).
    pub const SM90: Arch = Arch(90);

    /// From a compute capability pair, e.g. `(9, 0)`.
    pub fn from_capability(major: u32, minor: u32) -> Result<Self, Error> {
        Self::from_number(major * 10 + minor)
    }

    fn from_number(n: u32) -> Result<Self, Error> {
        if (50..=200).contains(&n) {
            Ok(Self(n))
        } else {
            Err(Error::InvalidArch(format!("sm_{n}")))
        }
    }

    /// The number, e.g. 80.
    pub fn number(self) -> u32 {
        self.0
    }

    /// The virtual architecture NVRTC emits PTX for, e.g. `compute_80`.
    pub fn compute_name(self) -> String {
        format!("compute_{}", self.0)
    }

    /// Parses a comma-separated list such as `sm_80,sm_90`.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, Error> {
        s.split(',').filter(|p| !p.trim().is_empty()).map(|p| p.trim().parse()).collect()
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}", self.0)
    }
}

impl FromStr for Arch {
    type Err = Error;

    /// Accepts `sm_80`, `compute_80` or `80`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let digits = s.strip_prefix("sm_").or_else(|| s.strip_prefix("compute_")).unwrap_or(s);
        let n: u32 = digits.parse().map_err(|_| Error::InvalidArch(s.to_string()))?;
        Self::from_number(n).map_err(|_| Error::InvalidArch(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_spellings() {
        assert_eq!("sm_80".parse::<Arch>().unwrap(), Arch::SM80);
        assert_eq!("compute_90".parse::<Arch>().unwrap(), Arch::SM90);
        assert_eq!("86".parse::<Arch>().unwrap().to_string(), "sm_86");
        assert_eq!(Arch::parse_list("sm_80, sm_90").unwrap(), vec![Arch::SM80, Arch::SM90]);
        assert_eq!(Arch::from_capability(9, 0).unwrap(), Arch::SM90);
        assert_eq!(Arch::SM80.compute_name(), "compute_80");
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["sm_", "sm_8x", "gfx90a", "sm_7", "sm_1000"] {
            assert!(matches!(bad.parse::<Arch>(), Err(Error::InvalidArch(_))), "{bad}");
        }
    }
}
