"""match replicas (#20 items 4 and 6), the pure parts: which partitions a replica reads, who owns an alert, how
counts add up, the configuration and `lfr up --replicas` checks. The whole system with two replicas is
tests/e2e/test_match_replicas.py."""

from __future__ import annotations

import pytest

from lfr.match.replicas import add_stats, alert_db_name, alert_owner, id_prefix
from lfr.pb import match_pb2 as pb
from lfr.runtime import subjects
from lfr.runtime.config import Config, ConfigError
from lfr.runtime.embedded import parse_replicas, replica_of, service_of


@pytest.mark.parametrize("replicas", range(1, subjects.MATCH_PARTITIONS + 1))
def test_every_partition_is_read_by_exactly_one_replica(replicas):
    read = [subjects.match_partitions(i, replicas) for i in range(replicas)]
    assert sorted(k for ks in read for k in ks) == list(range(subjects.MATCH_PARTITIONS))
    sizes = [len(ks) for ks in read]
    assert max(sizes) - min(sizes) <= 1  # as even as 12 partitions allow


def test_partitions_refuse_an_impossible_replica():
    for replica, replicas in ((0, 0), (2, 2), (-1, 2), (0, subjects.MATCH_PARTITIONS + 1)):
        with pytest.raises(ValueError):
            subjects.match_partitions(replica, replicas)


def test_the_mapping_partitions_the_subject_match_reads():
    [(src, dest)] = subjects.PARTITION_MAPPING.items()
    assert src == subjects.embeddings()
    assert dest.startswith(subjects.embeddings("{{wildcard(1)}}", "{{wildcard(2)}}") + ".")
    assert dest.endswith(f"{{{{partition({subjects.MATCH_PARTITIONS},1,2)}}}}")
    assert subjects.embeddings_partition(3, "dep", "cam") == "lfr.v1.embeddings.dep.cam.3"


def test_alert_ids_name_their_replica_and_single_replica_ids_are_unchanged():
    assert id_prefix(0, 1) == "" and id_prefix(1, 3) == "m1-"
    assert alert_owner("m2-" + "a" * 32) == 2 and alert_owner("m0-x") == 0
    assert alert_owner("a" * 32) == 0  # a single replica's (or an earlier) alert: replica 0's book
    assert alert_owner("mx-1") == 0 and alert_owner("") == 0
    assert alert_db_name(0) == "match-alerts.sqlite" and alert_db_name(2) == "match-alerts-2.sqlite"


def test_counts_add_up_and_disposal_times_are_the_worst_replicas():
    total = pb.MatchStats(faces_seen=5, alerts=1, nonmatches_disposed=4, disposal_ms_max=30, disposal_ms_p50=8,
                          pending_adjudications=1)
    add_stats(total, pb.MatchStats(faces_seen=7, alerts=2, nonmatches_disposed=5, stale_dropped=1,
                                   disposal_ms_max=90, disposal_ms_p50=5, alert_updates=3, overdue=1))
    assert (total.faces_seen, total.alerts, total.nonmatches_disposed, total.stale_dropped, total.alert_updates,
            total.pending_adjudications, total.overdue) == (12, 3, 9, 1, 3, 1, 1)
    assert (total.disposal_ms_max, total.disposal_ms_p50) == (90, 8)


def test_configuration_of_the_replicas():
    cfg = Config.from_env({"LFR_MATCH_REPLICAS": "2", "LFR_MATCH_REPLICA": "1", "LFR_MATCH_PEERS": "a:1,b:2"})
    assert (cfg.match_replicas, cfg.match_replica, cfg.match_peers) == (2, 1, "a:1,b:2")
    for env, key in (({"LFR_MATCH_REPLICAS": "2", "LFR_MATCH_PEERS": "a:1"}, "LFR_MATCH_PEERS"),
                     ({"LFR_MATCH_REPLICAS": "2", "LFR_MATCH_REPLICA": "2", "LFR_MATCH_PEERS": "a:1,b:2"},
                      "LFR_MATCH_REPLICA"),
                     ({"LFR_MATCH_REPLICAS": "13"}, "LFR_MATCH_REPLICAS")):
        with pytest.raises(ConfigError, match=key):
            Config.from_env(env)


def test_lfr_up_replicas_are_parsed_and_checked():
    assert parse_replicas("match=2,detection=2,embedding=2") == {"match": 2, "detection": 2, "embedding": 2}
    assert parse_replicas("") == {}
    for bad, why in (("watchlist=2", "single writers"), ("audit=2", "single writers"), ("match=0", "1 to 12"),
                     ("match=x", "1 to 12"), ("match", "1 to 12")):
        with pytest.raises(ValueError, match=why):
            parse_replicas(bad)
    assert (service_of("match-1"), replica_of("match-1")) == ("match", 1)
    assert (service_of("match"), replica_of("match")) == ("match", 0)
