"""What every service process stands on: configuration and settings (``config``), the
service shell and the loop's context (``service``), health and metrics endpoints
(``health``) and the run store (``runs``)."""
