Feature: queen-rbee is the cluster's one OpenAI-compatible endpoint
  Clients talk only to the queen; it finds (or starts) a worker on some hive and streams the
  answer back, with OpenAI's wire format.

  Scenario: a chat completion is served on demand and again from the warm worker
    Given a queen with one hive joined
    When I ask the queen "What is 2+2?" with max_tokens 8
    Then the answer has 8 completion tokens and finish_reason "length"
    And the queen spawned 1 worker
    When I ask the queen "What is 2+2?" with max_tokens 8
    Then the answer has 8 completion tokens and finish_reason "length"
    And the queen spawned 1 worker

  Scenario: an unknown model is a 404 the OpenAI SDKs understand
    Given a queen with one hive joined
    When I ask the queen for model "no-such-model"
    Then the response status is 404
    And the error code is "MODEL_NOT_SERVED"

  Scenario: the queen needs a client token
    Given a queen with one hive joined
    When I list the queen's models without a token
    Then the response status is 401
    And the error code is "UNAUTHORIZED"
    And the response carries "WWW-Authenticate: Bearer"
