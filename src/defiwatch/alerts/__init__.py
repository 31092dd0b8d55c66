"""The alert engine: users' rules evaluated against every event (rules, index, lifecycle, engine).

Pure core: rules.py (compiled rules), index.py (the rule index), lifecycle.py (the state
machine), evaluate.py (one event through both). I/O shell: engine.py. See docs/alerts.md.
"""

from defiwatch.alerts.config import AlertsApiConfig, EngineConfig, default_consumer_name
from defiwatch.alerts.engine import AlertEngine
from defiwatch.alerts.evaluate import Decision, Evaluator, MemoryStates
from defiwatch.alerts.events import AlertEventType, alert_dedup_key, alert_stream_key
from defiwatch.alerts.index import NaiveIndex, RuleIndex
from defiwatch.alerts.lifecycle import Action, InstanceState, Phase, Policy, Reason
from defiwatch.alerts.rules import CompiledRule, RuleKind, compile_rule

__all__ = [
    "Action",
    "AlertEngine",
    "AlertEventType",
    "AlertsApiConfig",
    "CompiledRule",
    "Decision",
    "EngineConfig",
    "Evaluator",
    "InstanceState",
    "MemoryStates",
    "NaiveIndex",
    "Phase",
    "Policy",
    "Reason",
    "RuleIndex",
    "RuleKind",
    "alert_dedup_key",
    "alert_stream_key",
    "compile_rule",
    "default_consumer_name",
]
