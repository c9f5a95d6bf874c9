//! Without a GPU (this project's CI) only the typed "unavailable" answers are checked and the
//! GPU tests print `skipped: no CUDA device`. With GPUs, every collective, element type and
//! reduction runs over every GPU of the machine (one rank per GPU, one thread per rank) and is
//! compared with `reference`: integers exactly, f32 within `1e-5 |want| + 1e-5`, and bf16/f16,
//! which NCCL accumulates in the storage type, within `world` roundings of the result.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use super::*;
use crate::reference;

/// The GPUs of this machine, or `None` after printing why the test is skipped.
fn gpus() -> Option<Vec<usize>> {
    if !squid_cuda::testing::gpu_available() {
        return None;
    }
    let devices = squid_cuda::Device::discover().expect("discovered above");
    match nccl_version() {
        Ok(_) => Some(devices.iter().map(|d| d.ordinal).collect()),
        Err(e) => {
            println!("skipped: NCCL unavailable ({e})");
            None
        }
    }
}

#[test]
fn without_a_gpu_or_nccl_every_entry_point_is_a_typed_error() {
    match nccl_version() {
        Ok(v) => println!("skipped: NCCL {v} is available here"),
        Err(e) => {
            assert!(matches!(e, Error::Unavailable { backend: "nccl", .. }), "{e:?}");
            assert_eq!(NcclGroup::new(&[0]).err(), Some(e.clone()));
            assert_eq!(NcclId::new().err(), Some(e.clone()));
            let id = NcclId::from_bytes([0; 128]);
            assert_eq!(NcclComm::init_rank(0, 0, 1, &id, NcclOptions::default()).err(), Some(e.clone()));
            println!("skipped: no CUDA device ({e})");
        }
    }
}

#[test]
fn ids_round_trip_through_bytes() {
    let bytes: [u8; 128] = std::array::from_fn(|i| (i * 7 + 3) as u8);
    assert_eq!(NcclId::from_bytes(bytes).to_bytes(), bytes);
}

/// Element i of rank r's input: small values, so sums and products stay exact in f32 and
/// within a few bf16 ulps.
fn input<T: Scalar>(rank: usize, len: usize, from: impl Fn(f64) -> T) -> Vec<T> {
    (0..len)
        .map(|i| {
            from(
                (((i * 7 + rank * 3) % 11) as f64 - 5.0)
                    / if T::DTYPE == DataType::I32 || T::DTYPE == DataType::I64 { 1.0 } else { 4.0 },
            )
        })
        .collect()
}

fn close<T: Scalar>(got: &[T], want: &[T], world: usize, to: impl Fn(T) -> f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("length {} != {}", got.len(), want.len()));
    }
    let ulp = match T::DTYPE {
        DataType::BF16 => 2f64.powi(-8),
        DataType::F16 => 2f64.powi(-11),
        DataType::F32 => 1e-5,
        DataType::I32 | DataType::I64 => 0.0,
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (to(g), to(w));
        let tol = if ulp == 0.0 { 0.0 } else { ulp * (world as f64 + 1.0) * (w.abs() + 1.0) };
        if (g - w).abs() > tol {
            return Err(format!("element {i}: got {g}, want {w} (tolerance {tol})"));
        }
    }
    Ok(())
}

/// Every collective of one element type on every rank, against `reference`.
fn check_type<T>(comm: &NcclComm, from: impl Fn(f64) -> T + Copy, to: impl Fn(T) -> f64 + Copy) -> Result<(), String>
where
    T: Scalar + DeviceRepr + ValidAsZeroBits,
{
    let (rank, world) = (comm.rank(), comm.world_size());
    let stream = comm.stream().clone();
    let err = |e: Error| e.to_string();
    let derr = |e: cudarc::driver::DriverError| format!("{e:?}");
    for len in [0usize, 1, 7, 1000, 65_537] {
        let inputs: Vec<Vec<T>> = (0..world).map(|r| input(r, len, from)).collect();
        let send = stream.clone_htod(&inputs[rank]).map_err(derr)?;
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min, ReduceOp::Prod] {
            let mut recv = stream.alloc_zeros::<T>(len).map_err(derr)?;
            comm.all_reduce(&send, &mut recv, op).map_err(err)?;
            close(&stream.clone_dtoh(&recv).map_err(derr)?, &reference::all_reduce(&inputs, op), world, to)
                .map_err(|e| format!("all_reduce {op:?} len {len}: {e}"))?;
        }
        let mut gathered = stream.alloc_zeros::<T>(len * world).map_err(derr)?;
        comm.all_gather(&send, &mut gathered).map_err(err)?;
        close(&stream.clone_dtoh(&gathered).map_err(derr)?, &reference::all_gather(&inputs), world, to)
            .map_err(|e| format!("all_gather len {len}: {e}"))?;
        let big: Vec<Vec<T>> = (0..world).map(|r| input(r, len * world, from)).collect();
        let big_send = stream.clone_htod(&big[rank]).map_err(derr)?;
        let mut block = stream.alloc_zeros::<T>(len).map_err(derr)?;
        comm.reduce_scatter(&big_send, &mut block, ReduceOp::Sum).map_err(err)?;
        close(
            &stream.clone_dtoh(&block).map_err(derr)?,
            &reference::reduce_scatter(&big, ReduceOp::Sum)[rank],
            world,
            to,
        )
        .map_err(|e| format!("reduce_scatter len {len}: {e}"))?;
        for root in 0..world {
            let mut buf = stream.clone_htod(&inputs[rank]).map_err(derr)?;
            comm.broadcast(&mut buf, root).map_err(err)?;
            close(&stream.clone_dtoh(&buf).map_err(derr)?, &inputs[root], world, to)
                .map_err(|e| format!("broadcast root {root} len {len}: {e}"))?;
        }
    }
    comm.barrier().map_err(err)
}

#[test]
fn every_collective_matches_the_reference_on_every_gpu() {
    let Some(devices) = gpus() else { return };
    for world in 1..=devices.len() {
        let group = NcclGroup::new(&devices[..world]).expect("NCCL group");
        let results = group.run(|comm| {
            check_type::<f32>(&comm, |x| x as f32, |x| x as f64)?;
            check_type::<bf16>(&comm, bf16::from_f64, |x| x.to_f64())?;
            check_type::<f16>(&comm, f16::from_f64, |x| x.to_f64())?;
            check_type::<i32>(&comm, |x| x as i32, |x| x as f64)?;
            check_type::<i64>(&comm, |x| x as i64, |x| x as f64)
        });
        let failures: Vec<String> = results
            .into_iter()
            .enumerate()
            .filter_map(|(rank, r)| r.expect("no rank panicked").err().map(|e| format!("rank {rank}: {e}")))
            .collect();
        assert!(failures.is_empty(), "world {world}: {failures:#?}");
    }
}

#[test]
fn one_thread_drives_every_gpu_with_a_batch_and_ring_exchanges_work() {
    let Some(devices) = gpus() else { return };
    let group = NcclGroup::new(&devices).expect("NCCL group");
    let comms = group.communicators();
    let world = comms.len();
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, 1001, |x| x as f32)).collect();
    let sends: Vec<_> = comms.iter().zip(&inputs).map(|(c, x)| c.stream().clone_htod(x).unwrap()).collect();
    let mut recvs: Vec<_> = comms.iter().map(|c| c.stream().alloc_zeros::<f32>(1001).unwrap()).collect();
    let mut batch = NcclBatch::new();
    for ((comm, send), recv) in comms.iter().zip(&sends).zip(recvs.iter_mut()) {
        batch.all_reduce(comm, send, recv, ReduceOp::Sum).unwrap();
    }
    batch.run().unwrap();
    let want = reference::all_reduce(&inputs, ReduceOp::Sum);
    for (comm, recv) in comms.iter().zip(&recvs) {
        assert_eq!(comm.stream().clone_dtoh(recv).unwrap(), want);
    }
    if world < 2 {
        println!("skipped: ring exchange needs 2 GPUs");
        return;
    }
    // Each rank sends to the next and receives from the previous, all in one group.
    let mut batch = NcclBatch::new();
    for (r, (comm, recv)) in comms.iter().zip(recvs.iter_mut()).enumerate() {
        batch.send(comm, &sends[r], (r + 1) % world).unwrap();
        batch.recv(comm, recv, (r + world - 1) % world).unwrap();
    }
    batch.run().unwrap();
    for (r, (comm, recv)) in comms.iter().zip(&recvs).enumerate() {
        assert_eq!(comm.stream().clone_dtoh(recv).unwrap(), inputs[(r + world - 1) % world]);
    }
}

#[test]
fn wrong_sizes_and_ranks_are_typed_errors_and_leave_the_group_usable() {
    let Some(devices) = gpus() else { return };
    let group = NcclGroup::new(&devices[..1]).expect("NCCL group");
    let comm = &group.communicators()[0];
    let stream = comm.stream().clone();
    let send = stream.alloc_zeros::<f32>(4).unwrap();
    let mut short = stream.alloc_zeros::<f32>(3).unwrap();
    let err = comm.all_gather(&send, &mut short).unwrap_err();
    assert!(matches!(err, Error::BufferSize { op: "all_gather", got: 3, expected: 4, .. }), "{err}");
    let err = comm.all_reduce(&send, &mut short, ReduceOp::Sum).unwrap_err();
    assert!(matches!(err, Error::BufferSize { op: "all_reduce", .. }), "{err}");
    let mut buf = stream.alloc_zeros::<f32>(4).unwrap();
    assert!(matches!(comm.broadcast(&mut buf, 1), Err(Error::InvalidRank { what: "root", .. })));
    assert!(matches!(comm.send(&send, 0), Err(Error::InvalidRank { what: "peer", .. })));
    assert_eq!(comm.failure(), None);
    comm.barrier().unwrap();
}

#[test]
fn a_rank_that_never_arrives_times_out_and_fails_the_group() {
    let Some(devices) = gpus() else { return };
    if devices.len() < 2 {
        println!("skipped: the timeout test needs 2 GPUs");
        return;
    }
    let options = NcclOptions { timeout: Duration::from_secs(2) };
    let group = NcclGroup::with_options(&devices[..2], options).expect("NCCL group");
    let results = group.run(|comm| {
        if comm.rank() == 1 {
            // Rank 1 never calls the all-reduce; it waits until rank 0 has given up.
            while comm.failure().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            return comm.barrier();
        }
        let send = comm.stream().alloc_zeros::<f32>(16).unwrap();
        let mut recv = comm.stream().alloc_zeros::<f32>(16).unwrap();
        comm.all_reduce(&send, &mut recv, ReduceOp::Sum)
    });
    let errors: Vec<Error> = results.into_iter().map(|r| r.expect("no rank panicked").unwrap_err()).collect();
    assert!(matches!(errors[0], Error::Timeout { waiting: 0, .. }), "{:?}", errors[0]);
    assert_eq!(errors[1], errors[0], "the peer gets the group's sticky error");
}

/// The `Communicator` impl (host slices staged through the GPU) on every type, so the `tp`
/// layers can run over NCCL ranks.
fn check_host<T: Scalar>(
    comm: &NcclComm,
    from: impl Fn(f64) -> T + Copy,
    to: impl Fn(T) -> f64 + Copy,
) -> Result<(), String> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let err = |e: Error| e.to_string();
    for len in [0usize, 1, 1000] {
        let inputs: Vec<Vec<T>> = (0..world).map(|r| input(r, len, from)).collect();
        let mut recv = vec![T::default(); len];
        Communicator::all_reduce(comm, &inputs[rank], &mut recv, ReduceOp::Sum).map_err(err)?;
        close(&recv, &reference::all_reduce(&inputs, ReduceOp::Sum), world, to)?;
        let mut gathered = vec![T::default(); len * world];
        Communicator::all_gather(comm, &inputs[rank], &mut gathered).map_err(err)?;
        close(&gathered, &reference::all_gather(&inputs), world, to)?;
        let big: Vec<Vec<T>> = (0..world).map(|r| input(r, len * world, from)).collect();
        Communicator::reduce_scatter(comm, &big[rank], &mut recv, ReduceOp::Max).map_err(err)?;
        close(&recv, &reference::reduce_scatter(&big, ReduceOp::Max)[rank], world, to)?;
        let mut buf = inputs[rank].clone();
        Communicator::broadcast(comm, &mut buf, world - 1).map_err(err)?;
        close(&buf, &inputs[world - 1], world, to)?;
        Communicator::all_reduce_in_place(comm, &mut buf, ReduceOp::Min).map_err(err)?;
        close(&buf, &inputs[world - 1], world, to)?;
    }
    Ok(())
}

#[test]
fn the_communicator_impl_stages_host_slices_through_the_gpu() {
    let Some(devices) = gpus() else { return };
    let results = NcclGroup::new(&devices).expect("NCCL group").run(|comm| {
        check_host::<f32>(&comm, |x| x as f32, |x| x as f64)?;
        check_host::<bf16>(&comm, bf16::from_f64, |x| x.to_f64())?;
        check_host::<f16>(&comm, f16::from_f64, |x| x.to_f64())?;
        check_host::<i32>(&comm, |x| x as i32, |x| x as f64)?;
        check_host::<i64>(&comm, |x| x as i64, |x| x as f64)?;
        Communicator::barrier(&comm).map_err(|e| e.to_string())
    });
    let failures: Vec<String> = results
        .into_iter()
        .enumerate()
        .filter_map(|(rank, r)| r.expect("no rank panicked").err().map(|e| format!("rank {rank}: {e}")))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}
