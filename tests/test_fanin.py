"""Many devices feeding shared tiers: the cluster file's load, its queueing price, the cut under it."""

import numpy as np
import pytest
import yaml

from partc.build import compile_model
from partc.cluster import cluster_from_dict
from partc.compilation import compile_plans
from partc.context import Scaling
from partc.errors import ClusterError
from partc.manifest import read_manifest
from partc.partition.load import SERVE_CALLS, TierLoad, erlang_c, serve, slots, tier_capacity
from partc.planning import plan_model


def fleet(device: str = "", cloud: str = "", link: str = "100Mbit/s") -> str:
    """Two tiers, rpi4 -> cloud-cpu, with ``device`` and ``cloud`` the tiers' extra YAML keys."""
    return f"""\
tiers:
  - {{name: device, target: rpi4, backend: torchscript{device}}}
  - {{name: cloud, target: cloud-cpu, backend: onnx{cloud}}}
links:
  - {{from: device, to: cloud, bandwidth: {link}, latency: 5ms}}
"""


def parse(text: str):
    return cluster_from_dict(yaml.safe_load(text), source="c.yaml")


# --- the cluster file -----------------------------------------------------------------------------------------

def test_scaling_defaults_keep_one_request_at_a_time():
    ctx = parse(fleet())
    assert [t.scaling for t in ctx.tiers] == [Scaling(), Scaling()]
    assert not ctx.loaded


def test_scaling_is_read():
    ctx = parse(fleet(", instances: 50, rate: 30/min", ", replicas: {min: 1, max: 8}, max_batch: 4"))
    assert ctx.loaded
    assert ctx.tiers[0].scaling == Scaling(instances=50, rate=0.5)
    assert ctx.tiers[1].scaling == Scaling(min_replicas=1, max_replicas=8, max_batch=4)
    assert parse(fleet(", rate: 5/s", ", replicas: 3")).tiers[1].scaling == Scaling(min_replicas=3, max_replicas=3)


@pytest.mark.parametrize(("device", "cloud", "message"), [
    (", instances: 50, rate: 5", "", "tiers[0].rate: 5 has no unit; use e.g. 5/s, 30/min, 100/h"),
    (", instances: 50, rate: '5'", "", "tiers[0].rate: '5' has no unit; use e.g. 5/s, 30/min, 100/h"),
    (", instances: 50, rate: [5]", "", "tiers[0].rate: expected a quantity with a unit (e.g. 5/s, 30/min, 100/h), "
                                       "got list"),
    (", instances: 50, rate: -5/s", "", "tiers[0].rate: '-5/s' is not a number followed by a unit; "
                                        "use e.g. 5/s, 30/min, 100/h"),
    (", instances: 50, rate: 0/s", "", "tiers[0].rate: '0/s' must be positive"),
    (", instances: 0, rate: 5/s", "", "tiers[0].instances: 0 is not a positive integer"),
    (", instances: many, rate: 5/s", "", "tiers[0].instances: 'many' is not a positive integer"),
    (", instances: 50", "", "tiers[0].rate: missing; with instances, give each first-tier instance's request "
                            "rate, e.g. rate: 5/s"),
    (", rate: 5/s", ", instances: 2", "tiers[1].instances: the last tier feeds no other tier; give it replicas "
                                       "instead"),
    (", rate: 5/s", ", rate: 5/s", "tiers[1].rate: requests start on the first tier; give rate there"),
    (", rate: 5/s, replicas: 2", "", "tiers[0].replicas: each instance of the first tier serves its own "
                                     "requests; give instances instead"),
    (", rate: 5/s", ", replicas: {min: 4, max: 2}", "tiers[1].replicas: min 4 is above max 2"),
    (", rate: 5/s", ", replicas: {min: 1}", "tiers[1].replicas: missing key 'max'"),
    (", rate: 5/s", ", replicas: -1", "tiers[1].replicas: -1 is not a positive integer"),
    (", rate: 5/s", ", replicas: 1.5", "tiers[1].replicas: 1.5 is not a positive integer"),
    (", rate: 5/s", ", max_batch: 0", "tiers[1].max_batch: 0 is not a positive integer"),
    (", rate: 5/s", ", max_batch: 5000", "tiers[1].max_batch: 5000 is above the most partc prices, 1024"),
])
def test_bad_scaling_is_one_clear_error(device, cloud, message):
    with pytest.raises(ClusterError) as err:
        parse(fleet(device, cloud))
    assert str(err.value) == f"c.yaml: {message}"


def test_instances_cannot_grow_down_the_tiers():
    text = """\
tiers:
  - {name: device, target: rpi4, backend: torchscript, instances: 4, rate: 5/s}
  - {name: edge, target: edge-x86, backend: onnx, instances: 8}
  - {name: cloud, target: cloud-cpu, backend: onnx}
links:
  - {from: device, to: edge, bandwidth: 20Mbit/s, latency: 5ms}
  - {from: edge, to: cloud, bandwidth: 50Mbit/s, latency: 20ms}
"""
    with pytest.raises(ClusterError, match=r"^c.yaml: tiers\[1\].instances: 8 instances, more than the 4 of the "
                                           "tier before; each instance is fed by those before it$"):
        parse(text)


# --- the queueing price, against hand-computed numbers ----------------------------------------------------------

def test_erlang_c_by_hand():
    # C(3, 2): Erlang B 2/3, 0.4, 0.8/3.8; C = B / (1 - rho (1 - B)) = 4/9
    assert erlang_c(np.array([3]), np.array([2.0]))[0] == pytest.approx(4 / 9)
    assert erlang_c(np.array([1]), np.array([0.5]))[0] == pytest.approx(0.5)  # M/./1: rho
    assert erlang_c(np.array([2]), np.array([3.0]))[0] == 1.0  # overloaded: every request waits


def test_md1_wait_is_exact():
    # M/D/1, rate 10/s, 50 ms: rho 0.5, Wq = rho S / (2 (1 - rho)) = 25 ms
    replicas, batch, utilisation, peak, wait = serve(TierLoad("t", 1, 10.0), [0.05], [0.0])
    assert (replicas[0], batch[0]) == (1, 1)
    assert utilisation[0] == pytest.approx(0.5) and peak[0] == pytest.approx(0.5)
    assert wait[0] == pytest.approx(0.025)


def test_replicas_needed_and_the_md3_wait():
    # 100/s of 20 ms: 2 Erlangs; the fewest replicas at most 80% busy: 3; Wq = 0.5 C(3, 2) / (3 / S - rate)
    replicas, batch, utilisation, peak, wait = serve(TierLoad("t", 1, 100.0, 1, 8), [0.02], [0.0])
    assert (replicas[0], batch[0]) == (3, 1)
    assert utilisation[0] == pytest.approx(2 / 3) and peak[0] == pytest.approx(0.25)
    assert wait[0] == pytest.approx(0.5 * (4 / 9) / (150 - 100))
    # bounds: at most 2 replicas (100% busy: infeasible), at least 5
    assert serve(TierLoad("t", 1, 100.0, 1, 2), [0.02], [0.0])[3][0] == pytest.approx(1.0)
    assert np.isinf(serve(TierLoad("t", 1, 100.0, 1, 2), [0.02], [0.0])[4][0])
    assert serve(TierLoad("t", 1, 100.0, 5, 8), [0.02], [0.0])[0][0] == 5


def test_batching_picks_the_least_latency():
    # S(b) = 10 ms + b x 10 ms, 60/s on one replica: b = 1 overloads (120%); the added seconds are
    # b = 2: 1/120 + 0.5 * 0.9 / (1/0.03 - 30) + 0.01 = 0.1533, b = 3: 2/120 + 0.08 + 0.02 = 0.1167,
    # b = 4: 3/120 + 0.075 + 0.03 = 0.13
    replicas, batch, utilisation, peak, wait = serve(TierLoad("t", 1, 60.0, 1, 1, 4), [0.02], [0.01])
    assert (replicas[0], batch[0]) == (1, 3)
    assert utilisation[0] == pytest.approx(0.8) and peak[0] == pytest.approx(0.75)
    assert wait[0] == pytest.approx(2 / 120 + 0.08 + 0.02)


def test_the_call_into_a_tier_limits_its_capacity():
    # 15 ms a request, 5 ms of CPU for the call into the tier, one 1-thread replica: 20 ms a request,
    # 50/s at most; 40/s keeps it 80% busy, and the call is part of what the load adds
    load = TierLoad("t", 1, 40.0, call=0.005)
    replicas, batch, utilisation, peak, wait = serve(load, [0.015], [0.0])
    assert tier_capacity(load, 0.015, 0.0) == pytest.approx(50.0)
    assert utilisation[0] == pytest.approx(0.8) and peak[0] == pytest.approx(0.8)
    assert wait[0] == pytest.approx(0.005 + 0.5 * 0.8 * 0.02 / 0.2)  # the call + M/D/1: rho S / (2 (1 - rho))
    # batches share F = 3 ms but not the call: S(4) = 3 + 4 x (12 + 5) = 71 ms, 4 / 0.071 per second
    assert tier_capacity(TierLoad("t", 1, 40.0, max_batch=4, call=0.005), 0.015, 0.003) == pytest.approx(4 / 0.071)
    # a replica on 4 cores: the call's 5 ms of CPU take 1.25 ms of its service
    assert tier_capacity(TierLoad("t", 1, 40.0, call=0.005, threads=4), 0.015, 0.0) == pytest.approx(1 / 0.01625)
    # a tier computing nothing is not called
    assert serve(load, [0.0], [0.0])[3][0] == 0.0 and np.isinf(tier_capacity(load, 0.0, 0.0))


def test_replicas_beyond_the_machines_cores_add_nothing():
    assert (slots(1, 4, 4), slots(1, 4, 1), slots(3, 4, 2), slots(1, 1, 2)) == (1, 4, 6, 1)
    # 100/s of 20 ms needs 3 replicas at 80% (test_replicas_needed_and_the_md3_wait); on machines
    # with 2 slots the third would wait for cores: 2 replicas, 100% busy, infeasible
    free = TierLoad("t", 1, 100.0, 1, 8)
    bound = TierLoad("t", 1, 100.0, 1, 8, slots=2)
    assert serve(free, [0.02], [0.0])[0][0] == 3
    replicas, _, _, peak, wait = serve(bound, [0.02], [0.0])
    assert replicas[0] == 2 and peak[0] == pytest.approx(1.0) and np.isinf(wait[0])
    assert tier_capacity(bound, 0.02, 0.0) == pytest.approx(100.0)  # 2 / 20 ms, not 8 / 20 ms
    assert tier_capacity(free, 0.02, 0.0) == pytest.approx(400.0)
    # a fixed count above the slots is kept (the cluster file's), but serves as the slots do
    fixed = serve(TierLoad("t", 1, 50.0, 4, 4, slots=1), [0.01], [0.0])
    assert fixed[0][0] == 4 and fixed[2][0] == pytest.approx(0.5)


def test_the_fleet_load_prices_calls_and_machines():
    from partc.partition.model import call_seconds, fleet_load
    from partc.targets import target

    ctx = parse(fleet(", instances: 10, rate: 5/s", ", nodes: 2, replicas: 4, max_batch: 4"))
    load = fleet_load(compile_plans("tests/models.py:conv_stack", ["1,3,32,32"], ctx).graph, ctx)
    device, cloud = load.tiers
    assert (device.call, device.slots) == (0.0, 1)  # the devices call; nothing calls them
    cores = target("cloud-cpu").cores
    # Ray Serve (replicas, batches): its ingress, handle call and replica queue; a replica takes a machine
    assert cloud.call == pytest.approx(SERVE_CALLS * call_seconds(target("cloud-cpu")))
    assert (cloud.threads, cloud.slots, cloud.servers) == (cores, 2, 2)
    one = parse(fleet(", instances: 10, rate: 5/s"))
    cloud = fleet_load(compile_plans("tests/models.py:conv_stack", ["1,3,32,32"], one).graph, one).tiers[1]
    assert cloud.call == pytest.approx(call_seconds(target("cloud-cpu")))  # one gRPC worker: one call


# --- the cut under load -----------------------------------------------------------------------------------------

ONE = fleet()
# the cloud's 4 replicas need 4 machines (a replica takes a machine's cores; on one they add nothing)
# 10/s: at 5/s the cloud's 4 replicas take every camera's whole model (84% busy)
FLEET = fleet(", instances: 50, rate: 10/s", ", nodes: 4, replicas: {min: 1, max: 4}, max_batch: 8")
OVERLOADED = fleet(", instances: 50, rate: 1000/s", ", replicas: 2")
RESNET = ("torchvision:resnet18", ["1,3,112,112"])


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.slow
def test_fifty_cameras_move_the_cut_to_the_devices(tmp_path):
    one = plan_model(*RESNET, write(tmp_path, ONE, "one.yaml"), compare=False)
    many = plan_model(*RESNET, write(tmp_path, FLEET, "fleet.yaml"), compare=False)
    on_device = [sum(t == "device" for t in r.assignment.values()) for r in (one, many)]
    assert on_device[0] == 1  # one camera: only the input stays; the cloud computes everything
    assert on_device[1] > 1  # fifty: the cloud (4 replicas at most) cannot take it all
    load = many.cost.load
    assert one.cost.load is None and load.feasible and load.latency_s > many.cost.latency
    cloud = load.tiers[1]
    assert (cloud.name, cloud.arrival_per_s, cloud.instances) == ("cloud", 500.0, 1)
    assert 1 <= cloud.replicas <= 4 and cloud.peak_utilisation < 1
    # the one-camera cut would overload the cloud under the fleet's load
    ctx = parse(FLEET)
    compiled = compile_plans(RESNET[0], RESNET[1], ctx)
    assert compiled.primary.plan.stages[0].tier == "device"
    graph = compiled.graph
    assert many.assignment == {n: graph.tiers[k] for n, k in zip(graph.names, compiled.primary.tiers, strict=True)}
    assert compiled.primary.cost.load == load  # partc plan and partc compile price it alike
    everything_on_cloud = np.where(compiled.graph.inputs, 0, 1)
    assert not _price(compiled, everything_on_cloud).feasible


def _price(compiled, tiers):
    from partc.partition.cost import predict
    from partc.partition.load import price_load
    from partc.partition.model import fleet_load

    return price_load(fleet_load(compiled.graph, compiled.ctx), tiers, predict(compiled.graph, tiers), compiled.links)


def test_an_overloaded_fleet_is_reported_infeasible(tmp_path, capsys):
    report = plan_model("tests/models.py:conv_stack", ["1,3,32,32"], write(tmp_path, OVERLOADED.replace(
        "rpi4", "jetson-nano")), compare=False)
    load = report.cost.load
    assert not load.feasible and load.latency_s is None
    assert load.overloaded and all(u.peak_utilisation >= 1 for u in load.overloaded)
    assert any(note.startswith(f"infeasible under load: {load.overloaded[0].name} would run at ")
               for note in report.notes)
    text = report.table()
    assert "infeasible under load" in text and "unbounded" in text
    assert report.to_json()["cost"]["load"]["latency_ms"] is None


def test_the_manifest_records_each_tiers_scaling(tmp_path):
    cluster = write(tmp_path, fleet(", instances: 20, rate: 10/s", ", replicas: {min: 2, max: 6}, max_batch: 4"))
    report = plan_model("tests/models.py:conv_stack", ["1,3,32,32"], cluster, compare=False)
    manifest = read_manifest(compile_model("tests/models.py:conv_stack", ["1,3,32,32"], cluster, tmp_path / "b").path)
    device, cloud = (t.scaling for t in manifest.tiers)
    assert (device.instances, device.rate_per_s, device.replicas, device.max_batch) == (20, 10.0, 1, 1)
    assert (cloud.min_replicas, cloud.max_replicas, cloud.max_batch) == (2, 6, 4)
    use = report.cost.load.tiers[1]
    assert (cloud.replicas, cloud.batch, cloud.arrival_per_s) == (use.replicas, use.batch, 200.0)
    assert cloud.utilisation == pytest.approx(use.utilisation)
    assert cloud.peak_utilisation == pytest.approx(use.peak_utilisation)


def test_the_fleet_example_plans(capsys):
    report = plan_model("tests/models.py:conv_stack", ["1,3,32,32"], "examples/fleet.yaml", compare=False)
    load = report.cost.load
    assert load.feasible and [u.name for u in load.tiers] == ["device", "edge", "cloud"]
    assert [u.arrival_per_s for u in load.tiers] == [5.0, 250.0, 250.0]
    assert load.tiers[1].replicas == 2 and 1 <= load.tiers[2].replicas <= 8
    assert "under load" in report.table()


def test_throughput_under_load_is_the_fleets_capacity():
    from partc.partition.load import Load, price_load
    from partc.partition.price import LinkPrice, Prediction

    # ten devices at 1/s; the cloud: 100 ms a request, nothing paid once per batch, 2 replicas of batches of 4
    load = Load((TierLoad("device", 10, 1.0), TierLoad("cloud", 1, 10.0, 1, 2, 4)), np.zeros((2, 2)))
    prediction = Prediction({"device": 0.0, "cloud": 0.1}, {"device->cloud": 1000}, ("device->cloud",))
    cost = price_load(load, np.array([0, 1]), prediction, [LinkPrice("device->cloud", 1e6, 0.005)])
    assert cost.capacity_per_s == pytest.approx(2 * 4 / 0.4)  # the cloud; the link sustains 10 x 1000/s
    assert cost.value("throughput") == pytest.approx(0.4 / 8)
    cloud = cost.tiers[1]
    assert cloud.replicas == 2 and cloud.peak_utilisation == pytest.approx(0.5)  # 10 x 0.4 / 4 / 0.8 = 1.25
    assert cost.latency_s == pytest.approx(0.1 + 0.005 + 0.001 + sum(u.wait_s for u in (*cost.tiers, *cost.links)))
