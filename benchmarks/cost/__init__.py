"""The cost benchmark's parts (:mod:`benchmarks.bench_cost` is its command): the settings and
what is built for each (:mod:`~benchmarks.cost.settings`), timing
(:mod:`~benchmarks.cost.timing`), peak memory (:mod:`~benchmarks.cost.memory`), and the records
and tables (:mod:`~benchmarks.cost.tables`)."""
