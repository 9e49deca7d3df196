"""The match service's alert book (SQLite): each alert's latest revision, its best probe crop and reference copy
while they are retained, its adjudication, and the time rules on the one injectable clock:

- an alert not adjudicated `due_s` after it was raised is flagged (AlertOverdue);
- its probe crop and reference copy are deleted `retention_s` after it was raised (CropsDeleted).

Every fact the book produces (an alert revision, an adjudication, a flag, a deletion) is written in the same
transaction as the change it reports, into the service's durable outbox (`lfr.runtime.outbox`, a table of this
database); it is published and removed once JetStream acknowledged it, so a crash cannot lose the record of a
deletion, nor an alert. Deleted crops are overwritten (secure_delete)
and the write-ahead log is truncated. Nothing of a face that matched nobody is ever written here.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from google.protobuf.message import Message

from lfr.pb import match_pb2 as pb
from lfr.runtime import events, subjects
from lfr.runtime.clock import Clock
from lfr.runtime.outbox import Outbox, Row

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
  alert_id TEXT PRIMARY KEY,
  deployment_id TEXT NOT NULL,
  raised_clock_ns INTEGER NOT NULL,   -- on the rules' clock
  revision INTEGER NOT NULL,
  alert BLOB NOT NULL,                -- lfr.match.v1.Alert, latest revision, without its crop
  probe_jpeg BLOB,
  reference_jpeg BLOB,
  crops_deleted_ns INTEGER,
  adjudication BLOB,                  -- lfr.match.v1.Adjudication
  overdue_ns INTEGER
);
CREATE INDEX IF NOT EXISTS alerts_by_deployment ON alerts(deployment_id, raised_clock_ns);
"""

PRODUCER = "match"


class AlertBook:
    def __init__(self, path: str | Path, clock: Clock, due_s: float, retention_s: float):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA secure_delete=ON")  # deleted crops are overwritten, not just unlinked
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()  # re-entrant: a transaction (lfr.runtime.outbox) spans several writes
        # the book's facts (alerts, adjudications, flags, deletions) wait here, committed with their change
        self.outbox = Outbox(self.db, self.lock, PRODUCER)
        with self.lock:  # facts left by a version that kept its own table move to the outbox, once
            if self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'pending_events'").fetchone():
                with self.outbox.transaction():
                    self.db.execute("INSERT OR IGNORE INTO lfr_outbox (msg_id, subject, data, created_ns)"
                                    " SELECT msg_id, subject, data, 0 FROM pending_events ORDER BY n")
                    self.db.execute("DROP TABLE pending_events")
        self.clock, self.due_ns, self.retention_ns = clock, int(due_s * 1e9), int(retention_s * 1e9)

    # Alerts ------------------------------------------------------------------------------------------
    def record(self, alert: pb.Alert, probe_jpeg: bytes, reference_jpeg: bytes = b"") -> None:
        """Store a raised alert, or a later revision of it (an older revision never overwrites a newer)."""
        bare = pb.Alert()
        bare.CopyFrom(alert)
        bare.ClearField("probe_jpeg")
        with self.lock:
            self.db.execute(
                "INSERT INTO alerts (alert_id, deployment_id, raised_clock_ns, revision, alert, probe_jpeg,"
                " reference_jpeg) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(alert_id) DO UPDATE SET"
                " revision = excluded.revision, alert = excluded.alert,"
                " probe_jpeg = CASE WHEN crops_deleted_ns IS NULL THEN excluded.probe_jpeg END"
                " WHERE excluded.revision > alerts.revision",
                (alert.alert_id, alert.envelope.deployment_id, self.clock.now_ns(), alert.revision,
                 bare.SerializeToString(), probe_jpeg or None, reference_jpeg or None))

    def current(self, alert_id: str) -> tuple[int, bytes, bool] | None:
        """(latest revision, probe crop or b'', crops deleted) of an alert, for StreamAlerts."""
        row = self.db.execute("SELECT revision, probe_jpeg, crops_deleted_ns FROM alerts WHERE alert_id = ?",
                              (alert_id,)).fetchone()
        return None if row is None else (row[0], row[1] or b"", row[2] is not None)

    def get(self, alert_id: str, with_images: bool = True) -> pb.AlertReview | None:
        row = self.db.execute("SELECT * FROM alerts WHERE alert_id = ?", (alert_id,)).fetchone()
        return None if row is None else self._review(row, with_images)

    def list(self, deployment_id: str, unadjudicated_only: bool = False,
             overdue_only: bool = False) -> list[pb.AlertReview]:
        sql = "SELECT * FROM alerts WHERE deployment_id = ?"
        if unadjudicated_only:
            sql += " AND adjudication IS NULL"
        if overdue_only:
            sql += " AND overdue_ns IS NOT NULL AND adjudication IS NULL"
        rows = self.db.execute(sql + " ORDER BY raised_clock_ns", (deployment_id,)).fetchall()
        return [self._review(r, with_images=False) for r in rows]

    def _review(self, row, with_images: bool) -> pb.AlertReview:
        (alert_id, _dep, raised, _rev, alert, probe, reference, deleted, adjudication, overdue) = row
        a = pb.Alert.FromString(alert)
        if with_images and probe:
            a.probe_jpeg = probe
        a.probe_deleted = deleted is not None
        review = pb.AlertReview(alert=a, adjudicated=adjudication is not None, overdue=overdue is not None,
                                due_at=events.ts_from_ns(raised + self.due_ns),
                                retain_until=events.ts_from_ns(raised + self.retention_ns))
        if adjudication is not None:
            review.adjudication.ParseFromString(adjudication)
        if deleted is not None:
            review.crops_deleted_at.CopyFrom(events.ts_from_ns(deleted))
            review.reference_status = "deleted at the end of the retention period"
        elif reference and with_images:
            review.reference_jpeg = reference
        return review

    def pending_counts(self, deployment_id: str) -> tuple[int, int]:
        """(alerts not adjudicated, of which flagged overdue) of a deployment."""
        row = self.db.execute("SELECT COUNT(*), COUNT(overdue_ns) FROM alerts WHERE deployment_id = ? AND"
                              " adjudication IS NULL", (deployment_id,)).fetchone()
        return int(row[0]), int(row[1])

    def raised_since(self, clock_ns: int) -> list[pb.Alert]:
        """The latest revision of every alert raised since `clock_ns` on the rules' clock (oldest first)."""
        rows = self.db.execute("SELECT alert FROM alerts WHERE raised_clock_ns >= ? ORDER BY raised_clock_ns",
                               (clock_ns,)).fetchall()
        return [pb.Alert.FromString(r[0]) for r in rows]

    # Adjudication ------------------------------------------------------------------------------------
    def adjudication(self, alert_id: str) -> pb.Adjudication | None:
        row = self.db.execute("SELECT adjudication FROM alerts WHERE alert_id = ?", (alert_id,)).fetchone()
        return None if row is None or row[0] is None else pb.Adjudication.FromString(row[0])

    def adjudicate(self, alert_id: str, adj: pb.Adjudication) -> pb.AlertAdjudicated:
        """Record an (already validated) adjudication and its event, in one transaction."""
        with self.lock:
            row = self.db.execute("SELECT alert, adjudication FROM alerts WHERE alert_id = ?", (alert_id,)).fetchone()
            if row is None:
                raise KeyError(alert_id)
            alert = pb.Alert.FromString(row[0])
            previous = pb.Adjudication.FromString(row[1]) if row[1] is not None else None
            adj.at.CopyFrom(events.ts_from_ns(self.clock.now_ns()))
            adj.amendments = previous.amendments + 1 if previous else 0
            ev = pb.AlertAdjudicated(
                envelope=events.envelope(PRODUCER, alert.envelope.deployment_id, alert.envelope.camera_id),
                alert_id=alert_id, entry_id=alert.entry_id, adjudication=adj,
                previous_outcome=previous.outcome if previous else pb.OUTCOME_UNSPECIFIED,
                raised_at=alert.raised_at)
            with self.outbox.transaction():  # the change and its fact commit together (lfr.runtime.outbox)
                self.db.execute("UPDATE alerts SET adjudication = ? WHERE alert_id = ?",
                                (adj.SerializeToString(), alert_id))
                self._pending(subjects.adjudications(alert.envelope.deployment_id), ev)
        return ev

    # Time rules --------------------------------------------------------------------------------------
    def sweep(self) -> tuple[list[pb.AlertOverdue], list[pb.CropsDeleted]]:
        """Flag alerts past their adjudication due time; delete crops past their retention period."""
        now = self.clock.now_ns()
        flagged: list[pb.AlertOverdue] = []
        deleted: list[pb.CropsDeleted] = []
        with self.lock:
            with self.outbox.transaction():  # the change and its fact commit together (lfr.runtime.outbox)
                rows = self.db.execute(
                    "SELECT alert_id, alert, raised_clock_ns FROM alerts WHERE adjudication IS NULL"
                    " AND overdue_ns IS NULL AND raised_clock_ns + ? <= ? ORDER BY raised_clock_ns",
                    (self.due_ns, now)).fetchall()
                for alert_id, data, raised in rows:
                    a = pb.Alert.FromString(data)
                    ev = pb.AlertOverdue(envelope=events.envelope(PRODUCER, a.envelope.deployment_id,
                                                                  a.envelope.camera_id),
                                         alert_id=alert_id, raised_at=a.raised_at,
                                         due_at=events.ts_from_ns(raised + self.due_ns))
                    self.db.execute("UPDATE alerts SET overdue_ns = ? WHERE alert_id = ?", (now, alert_id))
                    self._pending(subjects.alertflags(a.envelope.deployment_id), ev)
                    flagged.append(ev)
                rows = self.db.execute(
                    "SELECT alert_id, deployment_id, alert, probe_jpeg IS NOT NULL, reference_jpeg IS NOT NULL"
                    " FROM alerts WHERE crops_deleted_ns IS NULL AND raised_clock_ns + ? <= ?"
                    " ORDER BY raised_clock_ns", (self.retention_ns, now)).fetchall()
                by_deployment: dict[str, pb.CropsDeleted] = {}
                for alert_id, dep, data, had_probe, had_reference in rows:
                    a = pb.Alert.FromString(data)
                    ev = by_deployment.get(dep)
                    if ev is None:
                        ev = by_deployment[dep] = pb.CropsDeleted(
                            envelope=events.envelope(PRODUCER, dep), retention_s=self.retention_ns / 1e9,
                            oldest_raised_at=a.raised_at)
                    ev.alert_ids.append(alert_id)
                    ev.probe_crops_deleted += int(had_probe)
                    ev.reference_copies_deleted += int(had_reference)
                    ev.newest_raised_at.CopyFrom(a.raised_at)
                    self.db.execute("UPDATE alerts SET probe_jpeg = NULL, reference_jpeg = NULL, crops_deleted_ns = ?"
                                    " WHERE alert_id = ?", (now, alert_id))
                for dep, ev in by_deployment.items():
                    self._pending(subjects.retention(dep), ev)
                    deleted.append(ev)
            if deleted:  # the old pages of the crops must not survive in the write-ahead log either
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return flagged, deleted

    def deployments_with_images(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT deployment_id FROM alerts WHERE crops_deleted_ns IS NULL"
                                              " AND (probe_jpeg IS NOT NULL OR reference_jpeg IS NOT NULL)")]

    def delete_deployment_images(self, deployment_id: str, reason: str) -> pb.CropsDeleted | None:
        """Delete every retained probe crop and reference copy of a deployment's alerts now (urgent use not
        confirmed in time), with its CropsDeleted fact naming the reason; None when nothing was left."""
        now = self.clock.now_ns()
        with self.lock:
            with self.outbox.transaction():
                rows = self.db.execute(
                    "SELECT alert_id, alert, probe_jpeg IS NOT NULL, reference_jpeg IS NOT NULL FROM alerts"
                    " WHERE deployment_id = ? AND crops_deleted_ns IS NULL ORDER BY raised_clock_ns",
                    (deployment_id,)).fetchall()
                if not rows:
                    return None
                ev = pb.CropsDeleted(envelope=events.envelope(PRODUCER, deployment_id), reason=reason)
                for alert_id, data, had_probe, had_reference in rows:
                    a = pb.Alert.FromString(data)
                    if not ev.alert_ids:
                        ev.oldest_raised_at.CopyFrom(a.raised_at)
                    ev.alert_ids.append(alert_id)
                    ev.probe_crops_deleted += int(had_probe)
                    ev.reference_copies_deleted += int(had_reference)
                    ev.newest_raised_at.CopyFrom(a.raised_at)
                self.db.execute("UPDATE alerts SET probe_jpeg = NULL, reference_jpeg = NULL, crops_deleted_ns = ?"
                                " WHERE deployment_id = ? AND crops_deleted_ns IS NULL", (now, deployment_id))
                self._pending(subjects.retention(deployment_id), ev)
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return ev

    # Events waiting for JetStream --------------------------------------------------------------------
    def _pending(self, subject: str, msg: Message) -> None:
        self.outbox.add(subject, msg, msg.envelope.event_id)

    def pending(self, limit: int = 100) -> list[Row]:
        """The facts waiting for JetStream (the service's outbox publishes them)."""
        return self.outbox.pending(limit)

    def close(self) -> None:
        self.db.close()
