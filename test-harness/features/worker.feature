Feature: llm-worker-rbee serves one model and streams tokens over SSE
  A worker loads the default model (SmolLM2-135M-Instruct Q4_1), listens on an ephemeral
  loopback port with a bearer token, and answers exactly as llama.cpp does when greedy.

  Background:
    Given a running worker with the default model and a token

  Scenario: a greedy chat answer matches llama.cpp
    When I ask "What is 2+2?" greedily with max_tokens 24
    Then the stream is started, tokens, end, then [DONE]
    And the answer is "The answer to this classic math problem is 4."
    And the stop reason is "eos"

  Scenario: max_tokens bounds the answer
    When I ask "What is 2+2?" greedily with max_tokens 3
    Then the stop reason is "max_tokens"
    And 3 tokens were generated

  Scenario: a stop sequence ends the answer before it
    When I ask "What is 2+2?" greedily with stop sequence "classic"
    Then the answer is "The answer to this "
    And the stop reason is "stop_sequence"

  Scenario: a request without the token is refused
    When I send an inference request without a token
    Then the response status is 401
    And the error code is "UNAUTHORIZED"
    And the response carries "WWW-Authenticate: Bearer"

  Scenario: an out-of-range temperature is a 400 that names the field
    When I send the body {"prompt": "Hi", "temperature": 5}
    Then the response status is 400
    And the error code is "INVALID_PARAMETER"
    And the error message mentions "temperature"

  Scenario: a request while every slot is generating is told to retry
    When every slot of the worker is generating
    And I send the body {"prompt": "Hi", "max_tokens": 1}
    Then the response status is 503
    And the error code is "ALL_SLOTS_BUSY"
    And the response carries "Retry-After: 1"
