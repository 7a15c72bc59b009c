"""Serving benchmarks: load generation against a jaxserve server and the statistics it reports.

`workload` builds seeded request sets (synthetic, prompts files, multi-turn conversations), `driver` replays them
over gRPC with Poisson or closed-loop arrivals and times every streamed token, `report` turns the per-request records
into latency percentiles, throughput and goodput, and `plots` draws them (matplotlib, optional).
`jaxserve.cli.bench` (`jaxserve-bench`) wires them into a command.
"""
