"""BundleManifest: manifest.json round-trips byte for byte, and a bad manifest fails naming its key and origin."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from splitwave.common.manifest import BundleManifest, BundleSource, ManifestError


def test_round_trip_keeps_the_bytes(edge_bundle, tmp_path):
    b = edge_bundle("bert")
    text = (b.path / "manifest.json").read_text()
    m = BundleManifest.from_file(b.path)
    assert m == b.manifest
    assert m.to_json() == text  # a cached bundle's hash does not change when a reader writes it back
    assert m.to_json(indent=None) == json.dumps(json.loads(text))  # what a JoinReply carries
    assert BundleManifest.from_dict(m.to_dict()) == m
    assert m.factor_shapes() == {f.name: f.shape for f in m.factors} and m.factor_names == list(m.factor_shapes())
    # unknown keys (a newer exporter's) survive a read-modify-write, after the known ones
    extra = dict(m.to_dict(), future_key={"a": 1})
    again = BundleManifest.from_dict(extra)
    assert list(again.to_dict())[-1] == "future_key" and again.to_dict() == extra
    src = BundleSource(family="bert", tiny=True, num_labels=2, seed=0)
    written = BundleManifest.from_file(replace(again, source=src).write(tmp_path))
    assert written.source == src and written.extra == {"future_key": {"a": 1}}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("factors"), "key 'factors' is missing"),
        (lambda d: d.update(cut="2"), "'cut' must be an integer, got '2'"),
        (lambda d: d.update(cut=True), "'cut' must be an integer, got True"),
        (lambda d: d["factors"][1].update(shape=[4, -1]), "'factors[1].shape' must be a list of sizes"),
        (lambda d: d["lora"].pop("r"), "key 'lora.r' is missing"),
        (lambda d: d["graphs"].update(saved=["a.onnx"]), "'graphs.saved' must be [forward graph file"),
        (lambda d: d["grad_outputs"].clear(), "'grad_outputs' lacks the factor"),
        (lambda d: d.update(modes=["recompute", "saved", "other"]), "mode 'other' is listed in 'modes'"),
        (lambda d: d.update(format="splitwave-edge-bundle/9"), "format 'splitwave-edge-bundle/9' is not"),
    ],
)
def test_bad_manifest_names_key_and_origin(edge_bundle, tmp_path, change, message):
    d = edge_bundle("bert").manifest.to_dict()
    change(d)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError) as e:
        BundleManifest.from_file(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_manifest_from_the_wire_names_the_peer():
    with pytest.raises(ManifestError, match="JoinReply of h:1: not valid JSON"):
        BundleManifest.from_json("{", "the JoinReply of h:1")
    with pytest.raises(ManifestError, match="JoinReply of h:1: the manifest must be a JSON object, got"):
        BundleManifest.from_json("[1]", "the JoinReply of h:1")
    with pytest.raises(ManifestError, match="JoinReply of h:1: key 'format' is missing"):
        BundleManifest.from_json("{}", "the JoinReply of h:1")
    with pytest.raises(ManifestError, match="cannot read the bundle manifest"):
        BundleManifest.from_file("/nonexistent/bundle")
