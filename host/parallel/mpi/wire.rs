//! The wire: sends that own their data until MPI is done with them (`Outbox`), the ring all-reduce
//! over MPI messages (`MpiComm`), and the groups of ranks that reduce one stage's gradients.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::Result;
use crate::ops::Ops;
use crate::parallel::comm::{RingComm, Wire};

use super::world::{MpiWorld, Outbox, Shared};

/// The wire of [`MpiComm`]: buffers go through host memory as MPI messages.
pub struct MpiWire {
    pub(crate) world: Arc<MpiWorld>,
    pub(crate) comm: Shared,
    /// World rank of each group rank.
    pub(crate) world_ranks: Vec<usize>,
    pub(crate) out: Outbox,
}

impl<B: Backend> Wire<B> for MpiWire {
    fn post(&mut self, dev: &B, view: &B::Ref<'_, f32>, to: usize) -> Result<()> {
        let host = dev.download(view)?;
        self.out.send(&self.comm, to, self.world_ranks[to], 1, host, "a gradient chunk");
        Ok(())
    }
    fn take(&mut self, dev: &B, from: usize) -> Result<B::Buf<f32>> {
        self.out.progress();
        let v = self.world.recv::<f32>(&self.comm, from, self.world_ranks[from], 1, "a gradient chunk");
        dev.upload(&v)
    }
    fn flush(&mut self) -> Result<()> {
        self.out.flush();
        Ok(())
    }
}

/// The ring all-reduce between processes (the same ring as in one process).
pub type MpiComm<B> = RingComm<B, MpiWire>;

/// The ranks that hold the same stage in every replica: the group whose gradients are
/// all-reduced together. Handed to an [`AllReduce`](super::AllReduce) to build its communicator.
pub struct StageGroup {
    pub(crate) world: Arc<MpiWorld>,
    pub(crate) comm: Shared,
    /// This rank's index in the group (its replica).
    pub rank: usize,
    /// Ranks in the group (`dp`).
    pub size: usize,
    /// World rank of each group rank.
    pub world_ranks: Vec<usize>,
}

impl StageGroup {
    /// Group rank 0's `bytes`, on every rank of the group (e.g. an NCCL unique id).
    pub fn share_bytes(&self, bytes: Option<Vec<u8>>) -> Vec<u8> {
        const TAG: i32 = 5;
        if self.rank == 0 {
            let b = bytes.unwrap_or_default();
            for q in 1..self.size {
                self.world.send(&self.comm, q, self.world_ranks[q], TAG, b.clone(), "a communicator id");
            }
            b
        } else {
            self.world.recv::<u8>(&self.comm, 0, self.world_ranks[0], TAG, "a communicator id")
        }
    }

    /// The MPI ring over this group, on `dev`'s own queue (a tensor-parallel group's sums wait
    /// for the layer that wrote them, and the layer for the sums).
    pub(crate) fn ring_in_line<B: Ops>(self, dev: &B) -> MpiComm<B> {
        let (rank, size) = (self.rank, self.size);
        let wire = MpiWire {
            out: Outbox::new(&self.world),
            world: self.world,
            comm: self.comm,
            world_ranks: self.world_ranks,
        };
        MpiComm::new(rank, size, dev.clone(), wire)
    }

    /// The MPI ring over this group.
    pub fn ring<B: Ops>(self, dev: &B) -> Result<MpiComm<B>> {
        Ok(self.ring_in_line(&dev.with_own_queue()?))
    }
}

/// Builds one rank's communicator from its stage group and device.
pub type MakeComm<B> = Box<dyn FnOnce(StageGroup, &B) -> Result<Box<dyn crate::parallel::comm::Communicator<B>>>>;

/// The ring communicator over every rank of the world (collective: every rank calls it).
pub fn world_ring<B: Ops>(world: &Arc<MpiWorld>, dev: &B) -> Result<MpiComm<B>> {
    let group = StageGroup {
        world: world.clone(),
        comm: world.dup(),
        rank: world.rank,
        size: world.size,
        world_ranks: (0..world.size).collect(),
    };
    group.ring(dev)
}
