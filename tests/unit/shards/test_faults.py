import pytest

from shardgate.shards.faults import Fault, FaultInjector, InjectedFault

MARKER = [7, 8, 9]


def test_fault_fires_on_its_rank_at_its_step_only():
    fault = Fault.parse("replica=0,rank=1,step=3,kind=raise")
    for bystander in (FaultInjector(fault, 0, 0, 0), FaultInjector(fault, 1, 0, 1), FaultInjector(fault, 0, 1, 1)):
        for _ in range(5):  # another rank, another replica, a restarted replica
            bystander.on_step()
    injector = FaultInjector(fault, 0, 0, 1)
    injector.on_step()
    injector.on_step()
    with pytest.raises(InjectedFault, match="step 3"):
        injector.on_step()
    injector.on_step()  # once only


def prompt_injector(spec: str, replica: int, start: int, rank: int) -> FaultInjector:
    injector = FaultInjector(Fault.parse(spec), replica, start, rank)
    injector.bind_tokenizer(lambda text: MARKER if text == "POISON" else [0])
    return injector


def test_a_prompt_fault_fires_at_every_step_holding_its_marker_on_every_start_of_every_replica():
    for replica, start in ((0, 0), (1, 0), (0, 3)):
        injector = prompt_injector("prompt=POISON,kind=raise", replica, start, rank=0)
        injector.on_step([[1, 2, 3], [4, 7, 8]])  # no chunk holds 7, 8, 9 in a row
        for _ in range(2):
            with pytest.raises(InjectedFault):
                injector.on_step([[1, 2], [5, 7, 8, 9, 6]])
    bystanders = [prompt_injector("prompt=POISON,kind=raise", 0, 0, rank=1), prompt_injector("prompt=POISON,kind=raise,replica=1", 0, 0, 0)]
    for bystander in bystanders:  # another rank, another replica than the one named
        bystander.on_step([MARKER])


@pytest.mark.parametrize(
    "spec",
    [
        "rank=1",
        "replica=0,rank=x,step=1,kind=raise",
        "replica=0,rank=0,step=1,kind=explode",
        "nonsense",
        "rank=0,step=1,kind=raise",  # a step fault names its replica
        "replica=0,step=1,prompt=P,kind=raise",  # step or prompt, not both
        "prompt=P,kind=raise,colour=red",
    ],
)
def test_bad_specs_are_refused_clearly(spec):
    with pytest.raises(ValueError, match="SHARDGATE_FAULT"):
        Fault.parse(spec)
