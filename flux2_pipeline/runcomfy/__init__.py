"""A typed async client for the RunComfy FLUX.2 [dev] edit queue API (no Dagster inside).

Example::

    from flux2_pipeline.runcomfy import AsyncRunComfyClient, EditRequest

    async with AsyncRunComfyClient(token, base_url=url) as client:
        result = await client.run(EditRequest(prompt="add snow", image_urls=[image_url]))
"""

from flux2_pipeline.runcomfy.account import Balance, ModelPrice
from flux2_pipeline.runcomfy.client import (
    DEFAULT_ACCOUNT_BASE_URL,
    DEFAULT_BASE_URL,
    DEFAULT_LOST_JOB_GRACE,
    AsyncRunComfyClient,
    ClientStats,
)
from flux2_pipeline.runcomfy.codes import failure_blames_input
from flux2_pipeline.runcomfy.errors import (
    AccountRefusedError,
    APIError,
    AuthenticationError,
    BadRequestError,
    FieldIssue,
    InsufficientCreditError,
    InvalidEditRequest,
    JobDeadlineExceeded,
    JobLostError,
    MalformedResponseError,
    NotFoundError,
    RateLimitError,
    RequestRejectedError,
    ResultNotReadyError,
    RunComfyError,
    ServerError,
    SubmissionOutcomeUnknown,
    TransportError,
    UnknownJobStateError,
    is_account_refusal,
    submit_error_proves_no_job,
)
from flux2_pipeline.runcomfy.models import (
    IMAGE_SIZE_PIXELS,
    MODEL_PATH,
    PARAMETER_DEFAULTS,
    PARAMETER_NAMES,
    CancelOutcome,
    EditRequest,
    EditResult,
    JobHandle,
    JobState,
    JobStatus,
)
from flux2_pipeline.runcomfy.polling import LOCAL_POLL, REMOTE_POLL, PollSchedule
from flux2_pipeline.runcomfy.retry import RetryPolicy
from flux2_pipeline.runcomfy.transport import (
    AiohttpTransport,
    HttpTransport,
    HttpxTransport,
    RawResponse,
)

__all__ = [
    "DEFAULT_ACCOUNT_BASE_URL",
    "DEFAULT_BASE_URL",
    "DEFAULT_LOST_JOB_GRACE",
    "IMAGE_SIZE_PIXELS",
    "LOCAL_POLL",
    "MODEL_PATH",
    "PARAMETER_DEFAULTS",
    "PARAMETER_NAMES",
    "REMOTE_POLL",
    "APIError",
    "AccountRefusedError",
    "AiohttpTransport",
    "AsyncRunComfyClient",
    "AuthenticationError",
    "BadRequestError",
    "Balance",
    "CancelOutcome",
    "ClientStats",
    "EditRequest",
    "EditResult",
    "FieldIssue",
    "HttpTransport",
    "HttpxTransport",
    "InsufficientCreditError",
    "InvalidEditRequest",
    "JobDeadlineExceeded",
    "JobHandle",
    "JobLostError",
    "JobState",
    "JobStatus",
    "MalformedResponseError",
    "ModelPrice",
    "NotFoundError",
    "PollSchedule",
    "RateLimitError",
    "RawResponse",
    "RequestRejectedError",
    "ResultNotReadyError",
    "RetryPolicy",
    "RunComfyError",
    "ServerError",
    "SubmissionOutcomeUnknown",
    "TransportError",
    "UnknownJobStateError",
    "failure_blames_input",
    "is_account_refusal",
    "submit_error_proves_no_job",
]
