"""The network trained at the sites, the server's global model and the shipped ONNX must agree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import torch

from fl_client.architectures import Slab, build_network
from tests.conftest import REPO

JOB = REPO / "fl_jobs" / "ct-body-composition-fedavg" / "app_server" / "custom" / "portico_model.py"


def test_server_model_equals_site_model() -> None:
    spec = importlib.util.spec_from_file_location("portico_model", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server, site = module.BodyCompositionNet().state_dict(), build_network("ct-body-composition").state_dict()
    assert list(server) == list(site)
    assert all(server[k].shape == site[k].shape for k in site)
    assert torch.equal(server["0.levels"], site["0.levels"])


def test_shipped_onnx_has_the_site_architecture(tmp_path: Path) -> None:
    shipped = onnx.load(str(REPO / "models" / "ct-body-composition" / "model.onnx"))
    net = Slab(build_network("ct-body-composition")).eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 1, 64, 64),), str(tmp_path / "m.onnx"), opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamo=False)
    fresh = onnx.load(str(tmp_path / "m.onnx"))

    def shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
        return sorted(tuple(i.dims) for i in model.graph.initializer if len(i.dims) > 1)

    assert shapes(shipped) == shapes(fresh)
