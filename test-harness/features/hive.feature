Feature: rbee-hive supervises workers on a node
  An operator runs one hive per node; the queen (or an operator with curl) spawns workers
  through it, streams inference through it, and relies on it to restart crashed workers,
  refuse what does not fit, and shut everything down cleanly.

  Scenario: spawn a worker, stream an answer through the hive, stop it
    Given a running hive with a token
    When I spawn a worker for "file:SmolLM2-135M-Instruct.Q4_1.gguf"
    Then the response status is 202
    And the worker becomes ready within 120 seconds
    When I ask "What is 2+2?" through the hive greedily with max_tokens 12
    Then the stream is started, tokens, end, then [DONE]
    When I stop the worker
    Then the worker stopped gracefully and its process is gone

  Scenario: a crashed worker is restarted until the circuit breaker opens
    Given a running hive with a token and at most 2 crashes before the breaker opens
    And a ready worker
    When the worker process is killed with SIGKILL
    Then the worker is ready again with restart count 1
    When the worker process is killed with SIGKILL
    Then the worker is failed with its circuit breaker open

  Scenario: a model that does not fit the memory limit is refused with figures
    Given a running hive with a token and a memory limit of 300 MiB
    When I spawn a worker for "file:SmolLM2-135M-Instruct.Q4_1.gguf"
    Then the response status is 507
    And the error code is "INSUFFICIENT_RESOURCES"
    And the error message mentions "300 MiB is available"

  Scenario: a model reference outside the model directories is refused
    Given a running hive with a token
    When I spawn a worker for "file:../../../../etc/passwd"
    Then the response status is 400
    And the error code is "OUTSIDE_MODEL_DIRS"

  Scenario: the hive API needs the token
    Given a running hive with a token
    When I list the workers without a token
    Then the response status is 401
    And the error code is "UNAUTHORIZED"
    And the response carries "WWW-Authenticate: Bearer"

  Scenario: SIGTERM stops the hive and every worker
    Given a running hive with a token
    And a ready worker
    When the hive receives SIGTERM
    Then the hive exits cleanly within 30 seconds
    And no worker process is left
