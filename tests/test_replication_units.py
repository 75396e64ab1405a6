"""Replication parts on their own: the sqlite queue, manifest walking."""

from __future__ import annotations

import json

import pytest

from zotlb.queue import Job, JobQueue, Op, QueueFull, QueueUnusable
from zotlb.replication import ReplicationFailed, manifest_children


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
    assert jobs[0].body is None and jobs[0].op is Op.PUT
    assert reopened.load_body(jobs[0]) == b"{}"
    assert [j.reference for j in reopened.heads()] == ["v1"]


def test_a_broken_database_is_reported_not_raised_raw(tmp_path):
    queue = JobQueue(str(tmp_path), limit=10)
    queue.close()
    with pytest.raises(QueueUnusable, match="replication queue"):
        queue.add(job("r1", "v1"))
    assert len(queue) == 0


def test_the_bound_refuses_new_jobs(tmp_path):
    queue = JobQueue(None, limit=2)
    queue.add(job("r1", "v1"))
    queue.add(job("r2", "v1"))
    with pytest.raises(QueueFull):
        queue.add(job("r3", "v1"))
    assert len(queue) == 2
    assert not list(tmp_path.iterdir())


def test_manifest_children_of_an_image_an_index_and_an_artifact():
    layer = {"mediaType": "l", "digest": "sha256:l", "size": 1}
    config = {"mediaType": "c", "digest": "sha256:c", "size": 1}
    image = json.dumps({"config": config, "layers": [layer]}).encode()
    assert manifest_children(image, "application/vnd.oci.image.manifest.v1+json") == (
        [],
        [config, layer],
    )
    child = {"mediaType": "m", "digest": "sha256:m", "size": 1}
    index = json.dumps(
        {"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [child]}
    ).encode()
    assert manifest_children(index, None) == ([child], [])
    artifact = json.dumps({"blobs": [layer], "subject": child}).encode()
    # The subject is not copied along: it is the image the referrer points at.
    assert manifest_children(artifact, None) == ([], [layer])
    with pytest.raises(ReplicationFailed) as info:
        manifest_children(b"not json", None)
    assert info.value.permanent and info.value.cause == "bad_manifest"


def test_unusable_state_dir_stops_zotlb_with_a_clear_error(tmp_path):
    import json as json_
    import subprocess
    import sys

    import yaml

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    config = tmp_path / "lb.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "admin": {"listen": None},
                "log": {"format": "json"},
                "backends": [{"name": "a", "url": "http://127.0.0.1:1"}],
                "replication": {"state_dir": str(blocker / "state")},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "zotlb", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    failed = [
        json_.loads(line)
        for line in result.stderr.splitlines()
        if '"server.failed"' in line
    ]
    assert failed and "replication queue" in failed[0]["error"]
