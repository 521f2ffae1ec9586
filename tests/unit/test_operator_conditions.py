from deepseek_operator.conditions import Condition, condition_reason, condition_status, merge_conditions


def test_transition_time_kept_while_status_unchanged_and_reset_when_it_flips():
    first = merge_conditions(None, [Condition("Ready", False, "Waiting", "w")], now="T1", generation=1)
    assert first[0]["lastTransitionTime"] == "T1"
    same = merge_conditions(first, [Condition("Ready", False, "StillWaiting", "w2")], now="T2", generation=2)
    assert same[0]["lastTransitionTime"] == "T1"
    assert same[0]["reason"] == "StillWaiting" and same[0]["observedGeneration"] == 2
    flipped = merge_conditions(same, [Condition("Ready", True, "Done", "d")], now="T3", generation=2)
    assert flipped[0]["lastTransitionTime"] == "T3" and flipped[0]["status"] == "True"


def test_keep_others_preserves_conditions_written_by_another_part_of_the_reconcile():
    rollout = [{"type": "Progressing", "status": "True", "reason": "Starting", "message": "",
                "lastTransitionTime": "T0"}]
    merged = merge_conditions(rollout, [Condition("IssuerReady", True, "Ok", "")], now="T1", generation=1,
                              keep_others=True)
    assert [c["type"] for c in merged] == ["IssuerReady", "Progressing"]
    assert condition_status(merged, "Progressing") == "True"
    assert condition_reason(merged, "IssuerReady") == "Ok"
    replaced = merge_conditions(rollout, [Condition("IssuerReady", None, "Unknown", "")], now="T1", generation=1)
    assert [c["type"] for c in replaced] == ["IssuerReady"] and replaced[0]["status"] == "Unknown"
