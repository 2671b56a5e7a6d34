"""The test and demo kit: demos, workloads, network namespaces, the test guest."""
