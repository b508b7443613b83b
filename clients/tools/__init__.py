"""The `shardgate` command's tools built on the client library: bench (load generator and HF
baseline), tune (batching sweep), batch jobs, workloads, the in-process engine harness, and the
local server a command starts for itself."""
