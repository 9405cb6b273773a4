"""FedAvg that tolerates a dead site: a round closes after k of n results or a timeout.

NVFlare's stock ``FedAvg`` waits for every sampled site with no timeout, so one silent hospital
stalls the whole project. ``PorticoFedAvg`` sends each round to every site of the job and aggregates
as soon as ``min_responses`` results are in and ``wait_time_after_min_received`` has passed (or
``round_timeout`` expired). A round with fewer than ``min_responses`` results ends the job without
changing the model. After the last round the final global model goes to every site in a
``validate`` task (each site measures it and keeps it to export as a candidate package), with the
job's provenance: rounds, contributing sites, server-side metrics.

Runs on the server only (researchers' side); sites never run code from a job.
"""

import time

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg


class PorticoFedAvg(FedAvg):
    def __init__(self, *args, min_responses=1, round_timeout=600, wait_time_after_min_received=30,
                 job_name="", final_validation=True, **kwargs):
        super().__init__(*args, **kwargs)
        # attribute names equal argument names: NVFlare's job exporter reads them back
        self.min_responses = int(min_responses)
        self.round_timeout = int(round_timeout)
        self.wait_time_after_min_received = int(wait_time_after_min_received)
        self.job_name = str(job_name)
        self.final_validation = bool(final_validation)
        self.contributors = []

    def _aggregate_one_result(self, result):
        accepted = super()._aggregate_one_result(result)
        if accepted:
            site = (result.meta or {}).get("client_name")
            if site:
                self.contributors.append(str(site))
        return accepted

    def run(self):
        self.info(f"PorticoFedAvg: {self.num_rounds} round(s), k={self.min_responses}, "
                  f"timeout {self.round_timeout} s")
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        model = self.load_model()
        model.start_round = self.start_round
        model.total_rounds = self.num_rounds
        rounds_done = 0
        for current_round in range(self.start_round, self.start_round + self.num_rounds):
            self.current_round = current_round
            self.info(f"Round {current_round} started.")
            model.current_round = self.current_round
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, self.current_round, private=True, sticky=False)
            self.event(AppEventType.ROUND_STARTED)
            clients = self.sample_clients(self.num_clients)
            k = min(self.min_responses, len(clients))
            self._reset_round(len(clients))
            self.contributors = []
            started = time.monotonic()
            self.broadcast_model(data=model, task_name=self.task_name, targets=clients, min_responses=k,
                                 timeout=self.round_timeout,
                                 wait_time_after_min_received=self.wait_time_after_min_received,
                                 blocking=False, callback=self._aggregate_one_result)
            while self.get_num_standing_tasks():
                if self.abort_signal.triggered:
                    self.info("abort signal: finishing")
                    return
                time.sleep(self._task_check_period)
            if self._received_count < k:
                self.error(f"round {self.current_round}: {self._received_count} of {len(clients)} results, "
                           f"fewer than k={k}; stopping without changing the model")
                break
            self.info(f"round {self.current_round}: aggregated {self._received_count}/{len(clients)} results "
                      f"from {sorted(self.contributors)} in {time.monotonic() - started:.1f} s")
            self.event(AppEventType.BEFORE_AGGREGATION)
            aggregate = self._get_aggregated_result()
            self.fire_event_with_data(AppEventType.AFTER_AGGREGATION, self.fl_ctx, AppConstants.AGGREGATION_RESULT,
                                      aggregate)
            model = self.update_model(model, aggregate)
            self.save_model(model)
            rounds_done += 1
        if self.final_validation and rounds_done:
            self._final_validation(model, rounds_done)
        self.info("PorticoFedAvg finished")

    def _reset_round(self, expected):
        from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

        if self.aggregator:
            self.aggregator.reset_stats()
        else:
            self._aggr_helper = WeightedAggregationHelper(exclude_vars=self.exclude_vars)
            self._aggr_metrics_helper = WeightedAggregationHelper()
            self._all_metrics = True
        self._received_count = 0
        self._expected_count = expected
        self._params_type = None
        self._site_metric_weights = {}

    def _final_validation(self, model, rounds_done):
        metrics = {k: float(v) for k, v in (model.metrics or {}).items() if isinstance(v, (int, float))}
        final = FLModel(params=model.params, params_type=model.params_type, current_round=self.current_round,
                        meta={"portico_rounds": rounds_done, "portico_contributors": sorted(set(self.contributors)),
                              "portico_metrics": metrics, "portico_job_name": self.job_name})
        clients = self.sample_clients(self.num_clients)
        results = self.send_model_and_wait(task_name=AppConstants.TASK_VALIDATION, data=final, targets=clients,
                                           min_responses=min(self.min_responses, len(clients)),
                                           timeout=self.round_timeout)
        for r in results:
            self.info(f"final global model at {(r.meta or {}).get('client_name')}: {r.metrics}")
