"""MultitaskPromptEmbedding: a shared prompt P [tokens, dim] modulated per task by a low-rank
product: prompt(task) = P * (prefix_task_cols[task] @ prefix_task_rows[task]), with cols
[num_tasks, tokens, num_ranks] and rows [num_tasks, num_ranks, dim] (elementwise product)."""

from __future__ import annotations

import torch
from torch import nn

from peftx.tuners.multitask_prompt_tuning.config import SOURCE_INITS
from peftx.tuners.prompt_tuning.encoder import PromptEmbedding


class MultitaskPromptEmbedding(PromptEmbedding):
    def __init__(self, config, word_embeddings):
        super().__init__(config, word_embeddings)
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.num_tasks = config.num_tasks
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(config.num_tasks, total, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02,
                                                          size=(config.num_tasks, config.num_ranks, config.token_dim)))
        init = config.prompt_tuning_init.value
        if init in SOURCE_INITS and not config.inference_mode:  # inference: the adapter file sets every tensor
            self._init_from_source(config, init)

    def _init_from_source(self, config, init: str) -> None:
        from safetensors.torch import load_file
        path = config.prompt_tuning_init_state_dict_path
        if not path:
            raise ValueError(f"prompt_tuning_init={init!r} needs prompt_tuning_init_state_dict_path (the source "
                             "adapter's .safetensors file)")
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"prompt_tuning_init_state_dict_path must be a .safetensors file (peftx never unpickles), "
                             f"got {path!r}")
        try:
            source = load_file(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"prompt_tuning_init_state_dict_path: cannot read {path!r} as safetensors: {e}") from None
        needed = ["prompt_embeddings"] + ([] if init == "ONLY_SOURCE_SHARED" else ["prefix_task_cols", "prefix_task_rows"])
        missing = [k for k in needed if k not in source]
        if missing:
            raise ValueError(f"prompt_tuning_init_state_dict_path {path!r} lacks {missing}: not a multitask "
                             "prompt tuning adapter file")
        updates = {"embedding.weight": source["prompt_embeddings"]}
        if init != "ONLY_SOURCE_SHARED":
            cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
            if init == "AVERAGE_SOURCE_TASKS":
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            else:
                task = config.prompt_tuning_init_task
                if not isinstance(task, int) or not 0 <= task < cols.shape[0]:
                    raise ValueError(f"prompt_tuning_init_task must be in [0, {cols.shape[0]}) for the source "
                                     f"file's {cols.shape[0]} tasks, got {task!r}")
                cols, rows = cols[task:task + 1], rows[task:task + 1]
            # every target task starts from the chosen source factors (HF PEFT requires num_tasks == 1 here)
            updates["prefix_task_cols"] = cols.expand(self.num_tasks, -1, -1)
            updates["prefix_task_rows"] = rows.expand(self.num_tasks, -1, -1)
        own = dict(self.named_parameters())
        for k, v in updates.items():
            if v.shape != own[k].shape:
                raise ValueError(f"prompt_tuning_init_state_dict_path: source {k} has shape {tuple(v.shape)}, this "
                                 f"config needs {tuple(own[k].shape)} (num_virtual_tokens, num_ranks, token_dim must "
                                 "match the source)")
            with torch.no_grad():
                own[k].copy_(v)

    def check_task_ids(self, task_ids, batch_size: int) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("task_ids is required with multitask prompt tuning: pass task_ids=LongTensor[batch] "
                             "(one task index per sample) to forward/generate")
        task_ids = torch.as_tensor(task_ids, device=self.prefix_task_cols.device)
        if task_ids.dtype not in (torch.int64, torch.int32) or task_ids.shape != (batch_size,):
            raise ValueError(f"task_ids must be an integer tensor of shape ({batch_size},), got dtype {task_ids.dtype} "
                             f"shape {tuple(task_ids.shape)}")
        if batch_size and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
            raise ValueError(f"task_ids must lie in [0, {self.num_tasks}) (num_tasks={self.num_tasks}), got values "
                             f"{task_ids.tolist()}")
        return task_ids.long()

    def prompts(self, batch_size: int, task_ids=None) -> torch.Tensor:
        task_ids = self.check_task_ids(task_ids, batch_size)
        modulation = torch.bmm(self.prefix_task_cols[task_ids], self.prefix_task_rows[task_ids])
        return self.embedding.weight.unsqueeze(0) * modulation

    def saved_tensors(self):
        return {"prompt_embeddings": self.embedding.weight.detach(), "prefix_task_cols": self.prefix_task_cols.detach(),
                "prefix_task_rows": self.prefix_task_rows.detach()}

    def load_saved(self, tensors, source):
        super().load_saved(tensors, source)
        for k in ("prefix_task_cols", "prefix_task_rows"):
            if k not in tensors:
                raise ValueError(f"adapter {source!r} lacks {k!r}: not a multitask prompt tuning file")
            own = getattr(self, k)
            if tensors[k].shape != own.shape:
                raise ValueError(f"adapter {source!r}: {k} has shape {tuple(tensors[k].shape)}, this model expects "
                                 f"{tuple(own.shape)} (num_tasks, num_ranks or num_virtual_tokens differ)")
            with torch.no_grad():
                own.copy_(tensors[k].to(own.dtype))
