from pipelines.schema import WandbConfig
from pipelines.tracking import Tracker, offline_summary, wandb_mode


def test_offline_run_is_read_back_and_resumed(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(WandbConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(WandbConfig()) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    t = Tracker(WandbConfig(), tmp_path, "collect", {"data": {"num_problems": 3}})
    assert t.mode == "offline"
    t.log({"loss": 1.5}, step=0)
    t.log({"loss": 0.5}, step=1)
    t.summary({"accuracy": 0.75})
    t.table("rows", ["id", "ok"], [["a", True]])
    t.finish()
    summary = offline_summary(tmp_path)
    assert summary["accuracy"] == 0.75 and summary["loss"] == 0.5
    first_id = (tmp_path / "wandb_run_id").read_text()
    t2 = Tracker(WandbConfig(), tmp_path, "collect", {})
    t2.finish()
    assert t2.run_id == first_id
    assert "x" * 40 not in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file())
