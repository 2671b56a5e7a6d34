"""`postcopy migrate`: one command on Host A moves a running domain and its disks to Host B.

The orchestration is written once (`orchestrate.py`); what depends on the hypervisor sits behind
one small interface (`toolstack.py`), implemented for QEMU (`qemu.py`).  Host B is reached the way
`xl migrate` and Proxmox reach it: a shell command over `ssh` (`remote.py`), which runs
`postcopy migrate-receive` there (`agent.py`, the B side: it starts the receives and B's QEMU,
forwards QMP, declares the switchover, pivots and cleans up).  A's and B's records of a migration
(`records.py`) let `postcopy migrate --resume DOMAIN` pick it up after a detach or a crash.
`progress.py` shows the steps (rich, plain lines, or `--json` events); `verify_step.py` is the
verification before release.
"""
