#!/usr/bin/env python
"""The gRPC floor of the serving benchmark: an ``oodguard.v1.OODGuard`` server that does no work.

Every ``Predict`` is answered with one prebuilt response (``--response FILE``: a serialized
``PredictResponse``, captured from a real gateway by ``bench/serve_benchmark.py``), on the same stack as the
gateway (``grpc.aio`` server, the gateway's ``server_options``, gRPC health reporting SERVING). Its latency and
throughput are what any single-process Python gRPC server reaches on the machine with the gateway's
request and response sizes: the part of the gateway's overhead that is transport, not the gateway's work.

With ``--model FILE`` (a ``model.onnx``) it also runs each request's float32 tensor through that model before
answering, on the event loop, in a one-thread non-spinning ONNX Runtime session: what the gateway's embedded
backend does for a model this small, and nothing else (no validation, decision, metrics or reply building).
That is the ``grpc-floor-model`` target: transport plus the model as served (its runs come between idle gaps at
low load, where they cost more CPU than back to back), so the gateway's own work is what it adds above it.

    python bench/grpc_floor_server.py --listen 127.0.0.1:PORT --response FILE [--model FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from oodguard.serve.server import server_options
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc


class FixedAnswer(pb_grpc.OODGuardServicer):
    def __init__(self, response: pb.PredictResponse):
        self.response = response

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        return self.response


class ModelThenFixedAnswer(FixedAnswer):
    """Runs the request's tensor through the model (inline), then answers the prebuilt response."""

    def __init__(self, response: pb.PredictResponse, model: Path):
        super().__init__(response)
        from oodguard import repository as repo
        from oodguard.onnx_runner import OnnxModel

        self.session, self.input_name = OnnxModel(model, intra_op_threads=1, spin=False).session, repo.INPUT_NAME

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        tensor = request.tensor
        self.session.run(None, {self.input_name: np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape))})
        return self.response


async def serve(listen: str, response: pb.PredictResponse, max_message_bytes: int, model: Path | None = None) -> None:
    server = grpc.aio.server(options=server_options(max_message_bytes))
    answer = FixedAnswer(response) if model is None else ModelThenFixedAnswer(response, model)
    pb_grpc.add_OODGuardServicer_to_server(answer, server)
    checker = health.aio.HealthServicer()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if not server.add_insecure_port(listen):
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--response", type=Path, required=True, help="file holding a serialized PredictResponse")
    parser.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--model", type=Path, help="model.onnx to run on each request's float32 tensor before "
                        "answering (the grpc-floor-model target)")
    args = parser.parse_args(argv)
    response = pb.PredictResponse.FromString(args.response.read_bytes())
    asyncio.run(serve(args.listen, response, args.max_message_bytes, args.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
