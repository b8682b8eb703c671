"""Accelerator detection, the TPU table and worker placement from node resources."""

import pytest

from griffin_batch.cluster import hardware


def _node(i: int, **resources: float) -> hardware.Node:
    return hardware.Node(node_id=f"n{i}", address="127.0.0.1", resources=resources)


def test_tpu_table_shapes_are_consistent():
    for name, t in hardware.TPU_TYPES.items():
        assert t.name == name
        assert t.chips % t.hosts == 0, name
    assert hardware.tpu_type("v4-16") == hardware.TpuType("v4-16", chips=8, hosts=2)
    assert hardware.tpu_type("TPU-v5litepod-16-head").chips_per_host == 4
    with pytest.raises(ValueError, match="unknown TPU type 'v9-8'"):
        hardware.tpu_type("v9-8")


def test_tpu_type_of_node_reads_the_head_resource():
    assert hardware.tpu_type_of_node({"TPU": 4, "TPU-v4-8-head": 1}).name == "v4-8"
    assert hardware.tpu_type_of_node({"TPU": 4}) is None


def test_live_nodes_drops_dead_ones():
    raw = [
        {
            "NodeID": "a",
            "Alive": True,
            "NodeManagerAddress": "127.0.0.1",
            "Resources": {"CPU": 2.0},
        },
        {"NodeID": "b", "Alive": False, "Resources": {"CPU": 2.0}},
    ]
    assert [n.node_id for n in hardware.live_nodes(raw)] == ["a"]


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([_node(0, CPU=8)], hardware.Accelerator.CPU),
        ([_node(0, CPU=8), _node(1, CPU=8, GPU=8)], hardware.Accelerator.GPU),
        ([_node(0, CPU=8, GPU=1), _node(1, CPU=96, TPU=4)], hardware.Accelerator.TPU),
    ],
)
def test_detect_accelerator(nodes, expected):
    assert hardware.detect_accelerator(nodes) is expected


def test_tpu_workers_take_whole_hosts():
    nodes = [_node(0, CPU=8), _node(1, CPU=96, TPU=4), _node(2, CPU=96, TPU=4)]
    spec = hardware.worker_spec(nodes, "auto")
    assert spec.accelerator is hardware.Accelerator.TPU
    assert (spec.capacity, spec.hosts, spec.default_workers()) == (2, 2, 2)
    assert spec.ray_options() == {"num_cpus": 0.0, "resources": {"TPU": 4.0}}


def test_gpu_workers_per_gpu_or_per_host():
    nodes = [_node(0, CPU=32, GPU=8), _node(1, CPU=32, GPU=8)]
    per_gpu = hardware.worker_spec(nodes, "gpu")
    assert (per_gpu.capacity, per_gpu.default_workers()) == (16, 16)
    assert per_gpu.ray_options() == {"num_cpus": 0.0, "num_gpus": 1.0}
    per_host = hardware.worker_spec(nodes, "gpu", gpus_per_worker=8)
    assert (per_host.capacity, per_host.default_workers()) == (2, 2)


def test_cpu_workers_default_to_one_per_host():
    nodes = [_node(0, CPU=4), _node(1, CPU=4), _node(2, CPU=0.5)]
    spec = hardware.worker_spec(nodes, "cpu")
    assert (spec.capacity, spec.hosts, spec.default_workers()) == (8, 2, 2)


def test_requested_accelerator_missing_means_no_capacity():
    spec = hardware.worker_spec([_node(0, CPU=8)], "tpu")
    assert spec.capacity == 0


def test_accelerator_parse_names_choices():
    assert hardware.Accelerator.parse("TPU") is hardware.Accelerator.TPU
    with pytest.raises(ValueError, match="expected one of"):
        hardware.Accelerator.parse("npu")


def test_tpu_table_agrees_with_rays_own_tpu_naming():
    """Every slice in the table, as Ray's TPU utilities name and size it: the version is one
    Ray knows, some valid topology of that version makes that pod type, and chips in all and
    per host are Ray's."""
    from ray._private.accelerators import tpu as ray_tpu
    from ray.util import tpu

    for name, shape in hardware.TPU_TYPES.items():
        version = tpu.get_tpu_version_from_type(f"TPU-{name.split('-')[0].upper()}")
        assert name.startswith(version) and version in ray_tpu.VALID_TPU_TYPES
        assert ray_tpu.get_total_chips_from_accelerator_type(name) == shape.chips, name
        assert ray_tpu.get_num_tpu_visible_chips_per_host(name) == shape.chips_per_host, name
        topologies = [t for t in ray_tpu.VALID_TPU_TOPOLOGY[version]
                      if ray_tpu.infer_tpu_pod_type_from_topology(t, f"TPU-{version}") == name]
        assert topologies, f"no {version} topology Ray knows makes {name}"
    assert hardware.DEFAULT_TPU_CHIPS_PER_HOST == ray_tpu.DEFAULT_TPU_NUM_CHIPS_PER_HOST
