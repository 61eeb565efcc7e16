"""Operations signals: OpenTelemetry traces and metrics, the per-call record, Sentry."""
