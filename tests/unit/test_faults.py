import pytest

from shardgate.shards.faults import Fault, FaultInjector, InjectedFault


def test_fault_fires_on_its_rank_at_its_step_only():
    fault = Fault.parse("rank=1,step=3,kind=raise")
    other_rank = FaultInjector(0, fault)
    for _ in range(5):
        other_rank.on_step()
    injector = FaultInjector(1, fault)
    injector.on_step()
    injector.on_step()
    with pytest.raises(InjectedFault, match="step 3"):
        injector.on_step()
    injector.on_step()  # once only


@pytest.mark.parametrize("spec", ["rank=1", "rank=x,step=1,kind=raise", "rank=0,step=1,kind=explode", "nonsense"])
def test_bad_specs_are_refused_clearly(spec):
    with pytest.raises(ValueError, match="SHARDGATE_FAULT"):
        Fault.parse(spec)
