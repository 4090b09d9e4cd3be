"""Partitioning a model's DAG across tiers, on plain cost graphs.

- ``cost``: the cost graph, an assignment's cost, and the checks on it;
- ``model``: the cost graph of a profiled IR on a cluster;
- ``solve``: the exact solver (min-cut, or ``milp`` under caps and for throughput);
- ``baselines``: the classic strategies, priced on the same graph;
- ``load``: plans priced under a fleet's load (queueing, replicas, batching);
- ``family``: the plans optimal over a range of bandwidths, and a build's plan set.
"""
