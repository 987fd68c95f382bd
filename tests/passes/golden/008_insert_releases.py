# top-level graph
def forward(self, runtime, input_ids: "i64[2, 8]", labels: "i64[2, 8]"):
    keep_activation = ratel.keep_activation(runtime, 'input_ids', input_ids)  # by insert_transfers
    keep_activation_1 = ratel.keep_activation(runtime, 'labels', labels)  # by insert_transfers
    prefetch_params = ratel.prefetch_params(runtime, 'embed', 0)  # fetch_params host->gpu 10.00 KiB step=0 needed_by=0 slot=0; by insert_transfers
    prefetch_params_1 = ratel.prefetch_params(runtime, 'blocks.0', 1)  # fetch_params host->gpu 49.75 KiB step=0 needed_by=1 slot=1; by insert_transfers
    wait_params = ratel.wait_params(runtime, 'embed')  # by insert_transfers
    unit_embed = ratel.run_unit(runtime, 'embed', input_ids)  # by outline_units
    dropout: "f32[2, 8, 32]" = unit_embed[0]  # unit=embed; activation=host (2.00 KiB, unit input checkpoint)
    offload_activation = ratel.offload_activation(runtime, 'dropout', dropout)  # offload_activation gpu->host 2.00 KiB step=0 needed_by=6; by insert_transfers
    release_params = ratel.release_params(runtime, 'embed')  # release_params 10.00 KiB step=0 needed_by=0 slot=0; by insert_releases
    prefetch_params_2 = ratel.prefetch_params(runtime, 'blocks.1', 0)  # fetch_params host->gpu 49.75 KiB step=1 needed_by=2 slot=0; by insert_transfers
    wait_params_1 = ratel.wait_params(runtime, 'blocks.0')  # by insert_transfers
    unit_blocks_0 = ratel.run_unit(runtime, 'blocks.0', dropout)  # by outline_units
    add_2: "f32[2, 8, 32]" = unit_blocks_0[0]  # unit=blocks.0; activation=host (2.00 KiB, unit input checkpoint)
    offload_activation_1 = ratel.offload_activation(runtime, 'add_2', add_2)  # offload_activation gpu->host 2.00 KiB step=1 needed_by=5; by insert_transfers
    release_params_1 = ratel.release_params(runtime, 'blocks.0')  # release_params 49.75 KiB step=1 needed_by=1 slot=1; by insert_releases
    prefetch_params_3 = ratel.prefetch_params(runtime, 'head', 1)  # fetch_params host->gpu 8.25 KiB step=2 needed_by=3 slot=1; by insert_transfers
    wait_params_2 = ratel.wait_params(runtime, 'blocks.1')  # by insert_transfers
    unit_blocks_1 = ratel.run_unit(runtime, 'blocks.1', add_2)  # by outline_units
    add_4: "f32[2, 8, 32]" = unit_blocks_1[0]  # unit=blocks.1; activation=gpu (2.00 KiB, read again at the next step)
    keep_activation_2 = ratel.keep_activation(runtime, 'add_4', add_4)  # by insert_transfers
    release_params_2 = ratel.release_params(runtime, 'blocks.1')  # release_params 49.75 KiB step=2 needed_by=2 slot=0; by insert_releases
    prefetch_params_4 = ratel.prefetch_params(runtime, 'blocks.1', 0)  # fetch_params host->gpu 49.75 KiB step=3 needed_by=5 slot=0; by insert_transfers
    wait_params_3 = ratel.wait_params(runtime, 'head')  # by insert_transfers
    unit_head = ratel.run_unit(runtime, 'head', add_4, labels)  # by outline_units
    linear_8: "f32[2, 8, 64]" = unit_head[0]  # unit=head
    cross_entropy_loss: "f32[]" = unit_head[1]  # unit=head
    return (cross_entropy_loss, linear_8)
