"""Which agents share an evaluation actor, and what that actor asks Ray for (without Ray)."""

from harness.evaluate.config import AgentSpec
from harness.evaluate.hf import actor_demand, actor_groups, replicas
from harness.evaluate.runs import ResolvedAgent

LAPTOP = [{"CPU": 2.0, "memory": 1e10}]


def _agents(*specs: dict) -> list[ResolvedAgent]:
    return [
        ResolvedAgent(AgentSpec(name=f"a{i}", model="/m", **spec), "/m", None, "id") for i, spec in enumerate(specs)
    ]


def _names(groups: list[list[ResolvedAgent]]) -> list[list[str]]:
    return [[agent.spec.name for agent in group] for group in groups]


def test_agents_asking_for_part_of_a_cpu_share_up_to_one_cpu():
    four = _agents(*[{"num_cpus": 0.5}] * 4)
    assert _names(actor_groups(four, LAPTOP)) == [["a0", "a1"], ["a2", "a3"]]
    assert actor_demand(four[:2]) == {"CPU": 1.0, "GPU": 0.0}
    thirds = _agents(*[{"num_cpus": 0.3}] * 4)  # 0.9 together; a fourth would pass one CPU
    assert _names(actor_groups(thirds, LAPTOP)) == [["a0", "a1", "a2"], ["a3"]]


def test_whole_cpu_agents_and_different_replicas_run_alone():
    agents = _agents({"num_cpus": 1}, {"num_cpus": 0.5}, {"num_cpus": 0.5, "replicas": 2}, {"num_cpus": 0.5})
    assert _names(actor_groups(agents, LAPTOP)) == [["a0"], ["a1", "a3"], ["a2"]]


def test_custom_resources_are_added_up_and_must_fit_one_node():
    pinned = _agents(*[{"num_cpus": 0.25, "resources": {"node_b": 0.5}}] * 3)
    nodes = [{"CPU": 2.0}, {"CPU": 2.0, "node_b": 1.0}]
    assert _names(actor_groups(pinned, nodes)) == [["a0", "a1"], ["a2"]]
    assert actor_demand(pinned[:2]) == {"CPU": 0.5, "GPU": 0.0, "node_b": 1.0}
    elsewhere = _agents({"num_cpus": 0.25, "resources": {"node_b": 0.5}}, {"num_cpus": 0.25})
    assert _names(actor_groups(elsewhere, nodes)) == [["a0"], ["a1"]]  # other resources: other actors


def test_gpu_agents_share_one_gpu_and_never_a_cpu_agents_actor():
    gpu = [{"CPU": 16.0, "GPU": 1.0}]
    quarter = _agents(*[{"num_cpus": 1, "num_gpus": 0.25}] * 4, {"num_cpus": 0.5}, {"num_cpus": 0.5})
    assert _names(actor_groups(quarter, gpu)) == [["a0", "a1", "a2", "a3"], ["a4", "a5"]]
    whole = _agents(*[{"num_cpus": 1, "num_gpus": 1}] * 2)
    assert _names(actor_groups(whole, [{"CPU": 16.0, "GPU": 2.0}])) == [["a0"], ["a1"]]  # one device per actor


def test_replicas_fill_the_free_cpus_unless_an_agent_sets_them():
    one = _agents({"num_cpus": 1})
    assert replicas(actor_groups(one, LAPTOP), {"CPU": 2.0}) == [2]  # a lone agent no longer leaves a core idle
    four = _agents(*[{"num_cpus": 0.5}] * 4)  # two shared actors already take both CPUs
    assert replicas(actor_groups(four, LAPTOP), {"CPU": 2.0}) == [1, 1]
    mixed = _agents({"num_cpus": 1, "replicas": 3}, {"num_cpus": 1}, {"num_cpus": 1})
    assert replicas(actor_groups(mixed, [{"CPU": 8.0}]), {"CPU": 8.0}) == [3, 2, 2]  # 5 CPUs left for two
    assert replicas(actor_groups(mixed, [{"CPU": 2.0}]), {"CPU": 2.0}) == [3, 1, 1]  # at least one each
    gpu = _agents({"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1})
    assert replicas(actor_groups(gpu, [{"CPU": 16.0, "GPU": 4.0}]), {"CPU": 16.0, "GPU": 4.0}) == [4, 12]
