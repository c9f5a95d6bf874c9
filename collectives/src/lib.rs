#![doc = include_str!("../README.md")]

use std::time::Duration;

use thiserror::Error;

mod communicator;
mod dtype;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
mod reduce;
pub mod reference;
pub mod tp;

pub use communicator::Communicator;
pub use dtype::{DataType, Scalar};
pub use local::{LocalComm, LocalGroup};

/// The ranks a timeout waited for, in words (none: every rank arrived and a transfer stalled, or
/// a blocking MPI call never returned).
fn missing_ranks(missing: &[usize]) -> String {
    match missing {
        [] => "an operation to complete (every rank had arrived, or none is known missing)".to_string(),
        [r] => format!("rank {r}"),
        rs => format!("ranks {rs:?}"),
    }
}

/// What a collective call can fail with.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
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
    /// More ranks than a local (thread) group can hold: each pair of ranks has a mailbox.
    #[error("a local group of {world} ranks exceeds {max}")]
    WorldTooLarge {
        /// The ranks asked for.
        world: usize,
        /// The most a group holds.
        max: usize,
    },
    /// A root or peer that is not a rank of the group (or, for send/recv, is this rank).
    #[error("{op}: {what} {rank} is not a valid rank (world size {world}, this rank {this})")]
    InvalidRank {
        /// The call.
        op: &'static str,
        /// `root` or `peer`.
        what: &'static str,
        /// The rank given.
        rank: usize,
        /// The group's size.
        world: usize,
        /// The calling rank.
        this: usize,
    },
    /// The ranks' calls do not match (different collectives, types, lengths, reductions or
    /// roots, or a peer's buffers broke the size rule). Every rank gets this error from the same
    /// call and the group stays usable.
    #[error("{op}: {detail}")]
    Mismatch {
        /// The call this rank made.
        op: &'static str,
        /// Which rank disagreed, and how.
        detail: String,
    },
    /// A rank left the group: its communicator was dropped, or its thread panicked. Sticky.
    #[error("rank {rank} left the group ({}); the group is unusable", if *panicked { "panicked" } else { "dropped" })]
    PeerLost {
        /// The rank that left.
        rank: usize,
        /// Whether it left by panicking.
        panicked: bool,
    },
    /// A rank waited past the group's deadline for peers that did not arrive. Sticky.
    #[error("rank {waiting} waited {after:?} for {}; the group is unusable", missing_ranks(.missing))]
    Timeout {
        /// The rank whose deadline passed first.
        waiting: usize,
        /// The ranks it was waiting for.
        missing: Vec<usize>,
        /// The deadline.
        after: Duration,
    },
    /// The backend cannot run on this machine: its library (libnccl, libcuda) cannot be loaded,
    /// lacks a function this crate needs, is too old, or there is no GPU. Nothing was started.
    #[error("{backend} is unavailable: {detail}")]
    Unavailable {
        /// The backend (`nccl`).
        backend: &'static str,
        /// What is missing and what was tried.
        detail: String,
    },
    /// The backend's library (MPI, NCCL, the CUDA driver) reported an error or cannot run the
    /// call (for example a block too large for MPI's `int` counts, MPI initialised twice, an
    /// NCCL async error, a device buffer on another GPU). An error the library reported during
    /// a call is sticky: its state is then undefined and the group is unusable (an NCCL
    /// communicator is aborted).
    #[error("{op}: {detail}")]
    Backend {
        /// The call.
        op: &'static str,
        /// What the library said.
        detail: String,
    },
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
    pub(crate) fn name(self) -> &'static str {
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
