#![doc = include_str!("../README.md")]

use thiserror::Error;

/// What a collective call can fail with.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// A buffer's length breaks the collective's size rule.
    #[error("{op}: {what} has {got} elements, expected {expected} (world size {world})")]
    BufferSize {
        /// The collective that was called.
        op: &'static str,
        /// Which buffer is wrong.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length the rule asks for.
        expected: usize,
        /// The group's size.
        world: usize,
    },
    /// A world of zero ranks cannot run a collective.
    #[error("world size must be at least 1")]
    EmptyWorld,
}

/// The reductions every backend offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Sum divided by the world size.
    Avg,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
    /// Element-wise product.
    Prod,
}

/// The buffer-size rules of NCCL's collectives, checked before any data moves so a wrong size
/// is a typed error instead of memory corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    /// `send == recv`.
    AllReduce,
    /// `recv == world * send`.
    AllGather,
    /// `send == world * recv`.
    ReduceScatter,
    /// `send == recv`.
    Broadcast,
}

impl Collective {
    fn name(self) -> &'static str {
        match self {
            Self::AllReduce => "all_reduce",
            Self::AllGather => "all_gather",
            Self::ReduceScatter => "reduce_scatter",
            Self::Broadcast => "broadcast",
        }
    }

    /// Checks the send and receive lengths of one rank's call.
    pub fn check_sizes(self, send: usize, recv: usize, world: usize) -> Result<(), Error> {
        if world == 0 {
            return Err(Error::EmptyWorld);
        }
        let (what, got, expected) = match self {
            Self::AllReduce | Self::Broadcast => ("recv", recv, send),
            Self::AllGather => ("recv", recv, send * world),
            Self::ReduceScatter => ("send", send, recv * world),
        };
        if got == expected {
            Ok(())
        } else {
            Err(Error::BufferSize { op: self.name(), what, got, expected, world })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_rules_match_nccl() {
        assert_eq!(Collective::AllGather.check_sizes(4, 16, 4), Ok(()));
        assert_eq!(Collective::ReduceScatter.check_sizes(16, 4, 4), Ok(()));
        assert_eq!(Collective::AllReduce.check_sizes(7, 7, 3), Ok(()));
        assert_eq!(
            Collective::AllGather.check_sizes(4, 15, 4),
            Err(Error::BufferSize { op: "all_gather", what: "recv", got: 15, expected: 16, world: 4 })
        );
        assert!(Collective::ReduceScatter.check_sizes(15, 4, 4).is_err());
        assert_eq!(Collective::Broadcast.check_sizes(1, 1, 0), Err(Error::EmptyWorld));
    }
}
