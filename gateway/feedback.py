"""The feedback servicer: ``infergate.feedback.v1.Feedback`` over the model monitor.

``Report`` converts the message, joins the label in ``ModelMonitor.report`` and converts back;
errors map to status codes at the one boundary (``status_boundary``).
"""

from __future__ import annotations

from infergate.gateway._proto.infergate.feedback.v1 import feedback_pb2 as pb
from infergate.gateway._proto.infergate.feedback.v1 import feedback_pb2_grpc as pb_grpc
from infergate.gateway.identity import current_identity
from infergate.gateway.monitor import ModelMonitor
from infergate.gateway.servicer import status_boundary

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Feedback"].full_name


class FeedbackServicer(pb_grpc.FeedbackServicer):
    def __init__(self, monitor: ModelMonitor) -> None:
        self._monitor = monitor

    async def Report(self, request: pb.ReportRequest, context) -> pb.ReportResponse:
        async with status_boundary(context):
            outcome = self._monitor.report(request.request_id, request.label, request.row, current_identity.get())
            return pb.ReportResponse(
                model=outcome.model, variant=outcome.variant, predicted=outcome.predicted, correct=outcome.correct
            )


def add_feedback(server, monitor: ModelMonitor) -> str:
    """Register the Feedback servicer on ``server``; returns its service name for reflection."""
    pb_grpc.add_FeedbackServicer_to_server(FeedbackServicer(monitor), server)
    return SERVICE_NAME
