import pytest

from shardgate.shards.faults import Fault, FaultInjector, InjectedFault


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


@pytest.mark.parametrize("spec", ["rank=1", "replica=0,rank=x,step=1,kind=raise", "replica=0,rank=0,step=1,kind=explode", "nonsense"])
def test_bad_specs_are_refused_clearly(spec):
    with pytest.raises(ValueError, match="SHARDGATE_FAULT"):
        Fault.parse(spec)
