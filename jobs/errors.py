"""What a job's exit code says, and the one exception that means "bad input".

Kubernetes reads the exit code to decide whether a retry can help (`podFailurePolicy` in k8s/):
`2` never (the configuration or the data is wrong), `143` always (the pod was stopped and left its
work resumable), anything else is a runtime failure and is retried too.
"""

BAD_INPUT_EXIT_CODE = 2
# 128 + SIGTERM: stopped (preempted, evicted, deleted) after leaving its work resumable; retried.
PREEMPTED_EXIT_CODE = 143


class BadInput(Exception):
    """Bad configuration or bad input: never worth a retry, so the job exits with code 2 and this one line."""
