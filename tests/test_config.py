"""Config schema: errors name the bad field; every shipped config (and its links) validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitwave.common.config import ConfigError, load_config
from splitwave.runner import build_links, link_specs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"quick", "sst2-minilm-wireless", "codec-comparison", "cut-sweep", "bandwidth-sweep"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    links = build_links(cfg)
    assert len(links) == cfg.num_clients
    for pair in links:  # every link answers the one question
        assert pair.uplink.done(1000, 0.0) > 0 and pair.downlink.done(1000, 0.0) > 0


@pytest.mark.parametrize(
    "override, field",
    [
        ("training.batch_size=-1", "training.batch_size"),
        ("rounds.num_rounds=0", "rounds.num_rounds"),
        ("channel.mode=warp", "channel.mode"),
        ("training.codec_up=zip", "training.codec_up"),
        ("training.bogus=1", "training.bogus"),
    ],
)
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "quick.yaml", [override])
    assert field in str(e.value)


def test_cli_reports_the_field(capsys):
    from splitwave.cli import main

    rc = main(["simulate", str(ROOT / "configs" / "quick.yaml"), "--set", "training.batch_size=-1"])
    assert rc == 2
    assert "training.batch_size" in capsys.readouterr().err


def test_bad_link_spec_names_the_channel_section():
    cfg = load_config(ROOT / "configs" / "quick.yaml", ["channel.uplink={kind: static}"])
    with pytest.raises(ConfigError, match="channel"):
        build_links(cfg)
    cfg = load_config(ROOT / "configs" / "quick.yaml", ["channel.per_client=[{up: {}}]"])
    with pytest.raises(ConfigError, match=r"channel.per_client\[0\]"):
        link_specs(cfg)


def test_per_client_overrides_and_cell_placement():
    cfg = load_config(
        ROOT / "configs" / "quick.yaml",
        [
            "num_clients=3",
            "channel.per_client=[{}, {uplink: {rate_mbps: 1}}, "
            "{uplink: {kind: trace, file: Verizon-LTE-short.up, offset: random}}]",
        ],
    )
    specs = link_specs(cfg)
    assert specs[0]["uplink"]["rate_mbps"] == 10 and specs[1]["uplink"]["rate_mbps"] == 1
    assert specs[1]["uplink"]["latency_ms"] == 20  # merged over the default
    assert specs[2]["uplink"]["kind"] == "trace" and "rate_mbps" not in specs[2]["uplink"]
    cell = load_config(ROOT / "configs" / "sst2-minilm-wireless.yaml")
    specs = link_specs(cell)
    d = [s["uplink"]["distance_m"] for s in specs]
    assert len(set(d)) == cell.num_clients and all(35 <= x <= 500 for x in d)
    assert all(s["uplink"]["distance_m"] == s["downlink"]["distance_m"] for s in specs)
    assert specs == link_specs(cell)  # seeded: the same placement every time


@pytest.mark.parametrize(
    "override, hint",
    [
        ("training.batchsize=8", "training.batchsize: unknown key; did you mean training.batch_size?"),
        ("trainng.batch_size=8", "trainng: unknown key; did you mean training?"),
        ("training.optim.lrr=0.1", "training.optim.lrr: unknown key; did you mean training.optim.lr?"),
        ("server.security.insecur=true", "did you mean server.security.insecure?"),
        ("batch_size=8", "batch_size: unknown key; did you mean training.batch_size?"),  # right name, wrong section
        ("zzz=1", "zzz: unknown key; valid keys: name, seed"),
    ],
)
def test_unknown_keys_suggest_the_closest_valid_one(override, hint):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "quick.yaml", [override])
    assert hint in str(e.value)


def test_unknown_keys_in_a_yaml_file_get_the_same_hint(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("training:\n  batch_size: 8\n  optim: {learning_rate: 0.1}\nrounds: {num_round: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "rounds.num_round: unknown key; did you mean rounds.num_rounds?" in msg
    assert "training.optim.learning_rate: unknown key; valid keys of training.optim: lr, weight_decay" in msg


@pytest.mark.parametrize("item", ["training.batch_size", "=3", " .=3"])
def test_set_needs_key_equals_value(item):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ROOT / "configs" / "quick.yaml", [item])


def test_codec_choices_for_activations_and_adapters():
    quick = ROOT / "configs" / "quick.yaml"
    tr = load_config(quick, ["training.codec_up=int4", "training.codec_down=int4"]).training
    assert (tr.codec_up, tr.codec_down, tr.adapter_codec_up, tr.codec_adapter_down) == ("int4", "int4", "raw", "raw")
    assert load_config(quick, ["training.codec_up=bf16"]).training.adapter_codec_up == "bf16"  # today's rule
    tr = load_config(quick, ["training.codec_adapter_up=int8", "training.codec_adapter_down=int4"]).training
    assert (tr.adapter_codec_up, tr.codec_adapter_down) == ("int8", "int4")
    for side in ("up", "down"):
        with pytest.raises(ConfigError, match=rf"training.codec_adapter_{side}: .*top-k is not an adapter codec"):
            load_config(quick, [f"training.codec_adapter_{side}=topk"])


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["training.error_feedback=[up]"], ["'up'", "training.codec_up is 'raw'"]),
        (
            ["training.codec_up=int8", "training.error_feedback=[adapter_up]"],
            ["'adapter_up'", "codec_adapter_up is unset"],
        ),
        (["training.codec_down=fp16", "training.error_feedback=[down, adapter_down]"], ["'adapter_down'"]),
        (["training.codec_up=int8", "training.error_feedback=[up, up]"], ["twice"]),
        (["training.error_feedback=[sideways]"], ["training.error_feedback"]),
    ],
)
def test_error_feedback_needs_a_lossy_direction(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "quick.yaml", overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_error_feedback_on_lossy_directions_loads():
    tr = load_config(
        ROOT / "configs" / "quick.yaml",
        [
            "training.codec_up=int4",
            "training.codec_down=topk",
            "training.codec_adapter_up=int8",
            "training.codec_adapter_down=fp16",
            "training.error_feedback=[up, down, adapter_up, adapter_down]",
        ],
    ).training
    assert tr.error_feedback == ["up", "down", "adapter_up", "adapter_down"]
