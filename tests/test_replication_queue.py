"""The sqlite job queue on its own: lanes, retries, persistence, the bound."""

from __future__ import annotations

import pytest

from zotlb.queue import Job, JobQueue, Op, QueueFull


def job(repo: str, ref: str, target: str = "b", op: Op = Op.PUT) -> Job:
    return Job(op, repo, ref, "sha256:" + "0" * 64, "x/y", b"{}", "a", target)


def test_only_the_oldest_job_of_a_lane_may_run(tmp_path):
    queue = JobQueue(str(tmp_path), limit=10)
    push = queue.add(job("r1", "v1"))
    delete = queue.add(job("r1", "v1", op=Op.DELETE))
    other_repo = queue.add(job("r2", "v1"))
    other_peer = queue.add(job("r1", "v1", target="c"))
    assert [j.id for j in queue.heads()] == [push.id, other_repo.id, other_peer.id]

    # The delete waits for the push it follows, whatever its own schedule.
    queue.done(push)
    assert delete.id in [j.id for j in queue.heads()]
    assert len(queue) == 3
    assert queue.backlog() == {"b": 2, "c": 1}


def test_jobs_and_retry_state_survive_reopening(tmp_path):
    queue = JobQueue(str(tmp_path), limit=10)
    first = queue.add(job("r1", "v1"))
    queue.add(job("r1", "v2"))
    queue.retry_later(first, 30.0, "connect failed")
    queue.close()

    reopened = JobQueue(str(tmp_path), limit=10)
    jobs = list(reopened.jobs.values())
    assert [(j.reference, j.attempts) for j in jobs] == [("v1", 1), ("v2", 0)]
    assert jobs[0].last_error == "connect failed"
    assert jobs[0].next_at > jobs[0].created_at + 29
    assert jobs[0].body == b"{}" and jobs[0].op is Op.PUT
    assert [j.reference for j in reopened.heads()] == ["v1"]


def test_the_bound_refuses_new_jobs(tmp_path):
    queue = JobQueue(None, limit=2)
    queue.add(job("r1", "v1"))
    queue.add(job("r2", "v1"))
    with pytest.raises(QueueFull):
        queue.add(job("r3", "v1"))
    assert len(queue) == 2
    assert not list(tmp_path.iterdir())
