# Resources of the GPU rules: runtime from the cost model (vq4dit.cost.runtime_minutes: predicted time from
# benchmarks/rates.yaml x config key runtime.safety_factor x attempt, at most runtime.max_runtime).
from vq4dit.cost import runtime_minutes, runtime_pricer

RUNTIME_PRICER = runtime_pricer(config, f"{workflow.basedir}/benchmarks/rates.yaml")


def runtime(rule):
    """The runtime resource (minutes) of ``rule``'s jobs."""
    return lambda wildcards, attempt: runtime_minutes(RUNTIME_PRICER, rule, wildcards, attempt)
