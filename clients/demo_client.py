"""Call a running gateway with one in-distribution digit and one OOD input (uniform noise); print the answers.

    python -m oodguard.clients.demo_client --target 127.0.0.1:50051

The digit is the first 8x8 image of scikit-learn's digits set (a "0"), sent as a raw uint8 [1,8,8] tensor,
which the gateway converts with the model's recorded preprocessing; the noise is uint8 [1,28,28].
"""

from __future__ import annotations

import argparse
import sys

import grpc
import numpy as np

from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

#: digits[0] of scikit-learn's digits set, scaled from 0..16 to 0..255.
DIGIT_ZERO = np.array([
    [0, 0, 80, 207, 143, 16, 0, 0], [0, 0, 207, 239, 159, 239, 80, 0], [0, 48, 239, 32, 0, 175, 128, 0],
    [0, 64, 191, 0, 0, 128, 128, 0], [0, 80, 128, 0, 0, 143, 128, 0], [0, 64, 175, 0, 16, 191, 112, 0],
    [0, 32, 223, 80, 159, 191, 0, 0], [0, 0, 96, 207, 159, 0, 0, 0],
], dtype=np.uint8)


def tensor(images: np.ndarray) -> pb.Tensor:
    images = np.ascontiguousarray(images)
    return pb.Tensor(dtype=str(images.dtype), shape=list(images.shape), data=images.astype(images.dtype.newbyteorder("<")).tobytes())


def describe(label: str, response: pb.PredictResponse) -> str:
    item = response.predictions[0]
    d = item.decision
    deciding = ", ".join(f"{s}={item.scores[s]:.4g} (threshold {d.thresholds[s]:.4g}, p-value {d.p_values[s]:.3g})"
                         for s in d.deciding_scores)
    queued = f"queued as {item.queue_record_id}" if item.queue_record_id else pb.QueueStatus.Name(item.queue_status)
    return (f"{label}: class {item.class_name} (probability {item.probability:.3f}), {'OOD' if d.ood else 'in-distribution'} "
            f"by {d.mode}({deciding}){f', driven by {d.driver}' if d.driver else ''}; crossed: {', '.join(d.crossed) or 'none'}; {queued}; "
            f"model {response.model} v{response.version}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway address HOST:PORT")
    parser.add_argument("--model", default="", help="model name (default: the server's)")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise image")
    args = parser.parse_args(argv)
    noise = np.random.default_rng(args.seed).integers(0, 256, size=(1, 28, 28), dtype=np.uint8)
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.OODGuardStub(channel)
        try:
            for label, images in (("digit", DIGIT_ZERO[None]), ("noise", noise)):
                response = stub.Predict(pb.PredictRequest(tensor=tensor(images), model=args.model,
                                                          request_id=f"demo-{label}", metadata={"source": "demo_client"}),
                                        timeout=args.timeout)
                print(describe(label, response))
        except grpc.RpcError as exc:
            print(f"demo_client: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
