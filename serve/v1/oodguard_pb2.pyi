from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueueStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NOT_QUEUED: _ClassVar[QueueStatus]
    QUEUED: _ClassVar[QueueStatus]
    REJECTED_QUEUE_FULL: _ClassVar[QueueStatus]
NOT_QUEUED: QueueStatus
QUEUED: QueueStatus
REJECTED_QUEUE_FULL: QueueStatus

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("tensor", "images", "model", "version", "request_id", "metadata", "top_k")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    images: EncodedImages
    model: str
    version: int
    request_id: str
    metadata: _containers.ScalarMap[str, str]
    top_k: int
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., images: _Optional[_Union[EncodedImages, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClassProbability(_message.Message):
    __slots__ = ("index", "name", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    probability: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("ood", "crossed", "deciding_scores", "mode", "thresholds", "p_values", "reasons", "driver")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OOD_FIELD_NUMBER: _ClassVar[int]
    CROSSED_FIELD_NUMBER: _ClassVar[int]
    DECIDING_SCORES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    P_VALUES_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    ood: bool
    crossed: _containers.RepeatedScalarFieldContainer[str]
    deciding_scores: _containers.RepeatedScalarFieldContainer[str]
    mode: str
    thresholds: _containers.ScalarMap[str, float]
    p_values: _containers.ScalarMap[str, float]
    reasons: _containers.RepeatedScalarFieldContainer[str]
    driver: str
    def __init__(self, ood: _Optional[bool] = ..., crossed: _Optional[_Iterable[str]] = ..., deciding_scores: _Optional[_Iterable[str]] = ..., mode: _Optional[str] = ..., thresholds: _Optional[_Mapping[str, float]] = ..., p_values: _Optional[_Mapping[str, float]] = ..., reasons: _Optional[_Iterable[str]] = ..., driver: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("class_index", "class_name", "probability", "top_k", "scores", "decision", "queue_status", "queue_record_id", "sampled", "model", "version")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_STATUS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    class_name: str
    probability: float
    top_k: _containers.RepeatedCompositeFieldContainer[ClassProbability]
    scores: _containers.ScalarMap[str, float]
    decision: Decision
    queue_status: QueueStatus
    queue_record_id: str
    sampled: bool
    model: str
    version: int
    def __init__(self, class_index: _Optional[int] = ..., class_name: _Optional[str] = ..., probability: _Optional[float] = ..., top_k: _Optional[_Iterable[_Union[ClassProbability, _Mapping]]] = ..., scores: _Optional[_Mapping[str, float]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., queue_status: _Optional[_Union[QueueStatus, str]] = ..., queue_record_id: _Optional[str] = ..., sampled: _Optional[bool] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "version", "request_id", "predictions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    request_id: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("channels", "height", "width", "mean", "std", "order")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    channels: int
    height: int
    width: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    order: str
    def __init__(self, channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., order: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "max_batch_size", "preprocessing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    max_batch_size: int
    preprocessing: Preprocessing
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., max_batch_size: _Optional[int] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ...) -> None: ...

class ThresholdInfo(_message.Message):
    __slots__ = ("score", "threshold", "target_tpr", "n", "accepted", "achieved_tpr", "achieved_tpr_ci95_low", "achieved_tpr_ci95_high", "deciding")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TARGET_TPR_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_TPR_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_TPR_CI95_LOW_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_TPR_CI95_HIGH_FIELD_NUMBER: _ClassVar[int]
    DECIDING_FIELD_NUMBER: _ClassVar[int]
    score: str
    threshold: float
    target_tpr: float
    n: int
    accepted: int
    achieved_tpr: float
    achieved_tpr_ci95_low: float
    achieved_tpr_ci95_high: float
    deciding: bool
    def __init__(self, score: _Optional[str] = ..., threshold: _Optional[float] = ..., target_tpr: _Optional[float] = ..., n: _Optional[int] = ..., accepted: _Optional[int] = ..., achieved_tpr: _Optional[float] = ..., achieved_tpr_ci95_low: _Optional[float] = ..., achieved_tpr_ci95_high: _Optional[float] = ..., deciding: _Optional[bool] = ...) -> None: ...

class Accuracy(_message.Message):
    __slots__ = ("overall", "n", "per_class", "per_class_n")
    class PerClassEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PerClassNEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    OVERALL_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_N_FIELD_NUMBER: _ClassVar[int]
    overall: float
    n: int
    per_class: _containers.ScalarMap[str, float]
    per_class_n: _containers.ScalarMap[str, int]
    def __init__(self, overall: _Optional[float] = ..., n: _Optional[int] = ..., per_class: _Optional[_Mapping[str, float]] = ..., per_class_n: _Optional[_Mapping[str, int]] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "input", "class_names", "thresholds", "outputs", "test_accuracy")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    version: int
    input: InputSpec
    class_names: _containers.RepeatedScalarFieldContainer[str]
    thresholds: _containers.RepeatedCompositeFieldContainer[ThresholdInfo]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    test_accuracy: Accuracy
    def __init__(self, version: _Optional[int] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ..., thresholds: _Optional[_Iterable[_Union[ThresholdInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ..., test_accuracy: _Optional[_Union[Accuracy, _Mapping]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "versions", "latest_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    latest_version: int
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ..., latest_version: _Optional[int] = ...) -> None: ...

class DecisionPolicy(_message.Message):
    __slots__ = ("scores", "mode")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[str]
    mode: str
    def __init__(self, scores: _Optional[_Iterable[str]] = ..., mode: _Optional[str] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("models", "policy", "backend")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSpec]
    policy: DecisionPolicy
    backend: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSpec, _Mapping]]] = ..., policy: _Optional[_Union[DecisionPolicy, _Mapping]] = ..., backend: _Optional[str] = ...) -> None: ...
