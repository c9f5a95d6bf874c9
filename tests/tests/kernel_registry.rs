//! The registry the `squid` binary checks must hold every `.cu` file of the workspace.

use std::collections::BTreeSet;
use std::path::PathBuf;

use squid_tests::{files_with_suffix, workspace_root};

#[test]
fn every_cu_file_in_the_workspace_is_registered() {
    let root = workspace_root();
    let on_disk: BTreeSet<PathBuf> = files_with_suffix(&root, ".cu").into_iter().collect();
    assert!(!on_disk.is_empty(), "no .cu files found under {}", root.display());

    let registry = squid_pipeline::kernels::workspace_registry().unwrap();
    let registered: BTreeSet<PathBuf> = registry
        .iter()
        .map(|k| {
            let folder = k.crate_name.strip_prefix("squid-").unwrap_or(k.crate_name);
            PathBuf::from(folder).join(k.path)
        })
        .collect();
    let missing: Vec<_> = on_disk.difference(&registered).collect();
    let stale: Vec<_> = registered.difference(&on_disk).collect();
    assert!(missing.is_empty(), "kernel sources not in the workspace registry: {missing:?}");
    assert!(stale.is_empty(), "registered kernels whose files are gone: {stale:?}");
}
