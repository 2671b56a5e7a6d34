"""The test and demo kit: sample disks, workloads, network namespaces, the test guest, the demos.

Product code never imports this package (tests/test_architecture.py checks it); the one door from
the product into the kit is `postcopy demo`, which `postcopy.cli` loads by name from
`postcopy.kit.demo_command`.  Tests and benchmarks use the kit freely."""
