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
    linear_cross_entropy: "f32[]" = unit_head[1]  # unit=head
    return (linear_cross_entropy, linear_8)

# unit embed (self.unit_embed): reads 2 parameters, 0 buffers
def forward(self, input_ids: "i64[2, 8]", p_lm_head_weight: "f32[64, 32]", p_wpe_weight: "f32[16, 32]"):
    arange: "i64[8]" = aten.arange.default(8, device=cpu, pin_memory=False)  # unit=embed
    embedding: "f32[2, 8, 32]" = aten.embedding.default(p_lm_head_weight, input_ids)  # unit=embed
    embedding_1: "f32[8, 32]" = aten.embedding.default(p_wpe_weight, arange)  # unit=embed
    add: "f32[2, 8, 32]" = aten.add.Tensor(embedding, embedding_1)  # unit=embed
    dropout: "f32[2, 8, 32]" = aten.dropout.default(add, 0.0, True)  # unit=embed
    return (dropout,)

# unit blocks.0 (self.unit_blocks_0): reads 12 parameters, 0 buffers
def forward(self, dropout: "f32[2, 8, 32]", p_blocks_0_ln_1_weight: "f32[32]", p_blocks_0_ln_1_bias: "f32[32]", p_blocks_0_attn_qkv_weight: "f32[96, 32]", p_blocks_0_attn_qkv_bias: "f32[96]", p_blocks_0_attn_proj_weight: "f32[32, 32]", p_blocks_0_attn_proj_bias: "f32[32]", p_blocks_0_ln_2_weight: "f32[32]", p_blocks_0_ln_2_bias: "f32[32]", p_blocks_0_mlp_up_weight: "f32[128, 32]", p_blocks_0_mlp_up_bias: "f32[128]", p_blocks_0_mlp_down_weight: "f32[32, 128]", p_blocks_0_mlp_down_bias: "f32[32]"):
    layer_norm: "f32[2, 8, 32]" = aten.layer_norm.default(dropout, [32], p_blocks_0_ln_1_weight, p_blocks_0_ln_1_bias, 1e-05, False)  # unit=blocks.0
    linear: "f32[2, 8, 96]" = aten.linear.default(layer_norm, p_blocks_0_attn_qkv_weight, p_blocks_0_attn_qkv_bias)  # unit=blocks.0; flops=98304
    split: "tuple[3]" = aten.split.Tensor(linear, 32, -1)  # unit=blocks.0
    getitem: "f32[2, 8, 32]" = split[0]  # unit=blocks.0
    getitem_1: "f32[2, 8, 32]" = split[1]  # unit=blocks.0
    getitem_2: "f32[2, 8, 32]" = split[2]  # unit=blocks.0
    view: "f32[2, 8, 2, 16]" = aten.view.default(getitem, [2, 8, 2, 16])  # unit=blocks.0
    transpose: "f32[2, 2, 8, 16]" = aten.transpose.int(view, 1, 2)  # unit=blocks.0
    view_1: "f32[2, 8, 2, 16]" = aten.view.default(getitem_1, [2, 8, 2, 16])  # unit=blocks.0
    transpose_1: "f32[2, 2, 8, 16]" = aten.transpose.int(view_1, 1, 2)  # unit=blocks.0
    view_2: "f32[2, 8, 2, 16]" = aten.view.default(getitem_2, [2, 8, 2, 16])  # unit=blocks.0
    transpose_2: "f32[2, 2, 8, 16]" = aten.transpose.int(view_2, 1, 2)  # unit=blocks.0
    scaled_dot_product_attention: "f32[2, 2, 8, 16]" = aten.scaled_dot_product_attention.default(transpose, transpose_1, transpose_2, None, 0.0, True)  # unit=blocks.0; flops=16384
    transpose_3: "f32[2, 8, 2, 16]" = aten.transpose.int(scaled_dot_product_attention, 1, 2)  # unit=blocks.0
    reshape: "f32[2, 8, 32]" = aten.reshape.default(transpose_3, [2, 8, 32])  # unit=blocks.0
    linear_1: "f32[2, 8, 32]" = aten.linear.default(reshape, p_blocks_0_attn_proj_weight, p_blocks_0_attn_proj_bias)  # unit=blocks.0; flops=32768
    dropout_1: "f32[2, 8, 32]" = aten.dropout.default(linear_1, 0.0, True)  # unit=blocks.0
    add_1: "f32[2, 8, 32]" = aten.add.Tensor(dropout, dropout_1)  # unit=blocks.0
    layer_norm_1: "f32[2, 8, 32]" = aten.layer_norm.default(add_1, [32], p_blocks_0_ln_2_weight, p_blocks_0_ln_2_bias, 1e-05, False)  # unit=blocks.0
    linear_2: "f32[2, 8, 128]" = aten.linear.default(layer_norm_1, p_blocks_0_mlp_up_weight, p_blocks_0_mlp_up_bias)  # unit=blocks.0; flops=131072
    gelu: "f32[2, 8, 128]" = aten.gelu.default(linear_2, approximate='tanh')  # unit=blocks.0
    linear_3: "f32[2, 8, 32]" = aten.linear.default(gelu, p_blocks_0_mlp_down_weight, p_blocks_0_mlp_down_bias)  # unit=blocks.0; flops=131072
    dropout_2: "f32[2, 8, 32]" = aten.dropout.default(linear_3, 0.0, True)  # unit=blocks.0
    add_2: "f32[2, 8, 32]" = aten.add.Tensor(add_1, dropout_2)  # unit=blocks.0
    return (add_2,)

# unit blocks.1 (self.unit_blocks_1): reads 12 parameters, 0 buffers
def forward(self, add_2: "f32[2, 8, 32]", p_blocks_1_ln_1_weight: "f32[32]", p_blocks_1_ln_1_bias: "f32[32]", p_blocks_1_attn_qkv_weight: "f32[96, 32]", p_blocks_1_attn_qkv_bias: "f32[96]", p_blocks_1_attn_proj_weight: "f32[32, 32]", p_blocks_1_attn_proj_bias: "f32[32]", p_blocks_1_ln_2_weight: "f32[32]", p_blocks_1_ln_2_bias: "f32[32]", p_blocks_1_mlp_up_weight: "f32[128, 32]", p_blocks_1_mlp_up_bias: "f32[128]", p_blocks_1_mlp_down_weight: "f32[32, 128]", p_blocks_1_mlp_down_bias: "f32[32]"):
    layer_norm_2: "f32[2, 8, 32]" = aten.layer_norm.default(add_2, [32], p_blocks_1_ln_1_weight, p_blocks_1_ln_1_bias, 1e-05, False)  # unit=blocks.1
    linear_4: "f32[2, 8, 96]" = aten.linear.default(layer_norm_2, p_blocks_1_attn_qkv_weight, p_blocks_1_attn_qkv_bias)  # unit=blocks.1; flops=98304
    split_1: "tuple[3]" = aten.split.Tensor(linear_4, 32, -1)  # unit=blocks.1
    getitem_3: "f32[2, 8, 32]" = split_1[0]  # unit=blocks.1
    getitem_4: "f32[2, 8, 32]" = split_1[1]  # unit=blocks.1
    getitem_5: "f32[2, 8, 32]" = split_1[2]  # unit=blocks.1
    view_3: "f32[2, 8, 2, 16]" = aten.view.default(getitem_3, [2, 8, 2, 16])  # unit=blocks.1
    transpose_4: "f32[2, 2, 8, 16]" = aten.transpose.int(view_3, 1, 2)  # unit=blocks.1
    view_4: "f32[2, 8, 2, 16]" = aten.view.default(getitem_4, [2, 8, 2, 16])  # unit=blocks.1
    transpose_5: "f32[2, 2, 8, 16]" = aten.transpose.int(view_4, 1, 2)  # unit=blocks.1
    view_5: "f32[2, 8, 2, 16]" = aten.view.default(getitem_5, [2, 8, 2, 16])  # unit=blocks.1
    transpose_6: "f32[2, 2, 8, 16]" = aten.transpose.int(view_5, 1, 2)  # unit=blocks.1
    scaled_dot_product_attention_1: "f32[2, 2, 8, 16]" = aten.scaled_dot_product_attention.default(transpose_4, transpose_5, transpose_6, None, 0.0, True)  # unit=blocks.1; flops=16384
    transpose_7: "f32[2, 8, 2, 16]" = aten.transpose.int(scaled_dot_product_attention_1, 1, 2)  # unit=blocks.1
    reshape_1: "f32[2, 8, 32]" = aten.reshape.default(transpose_7, [2, 8, 32])  # unit=blocks.1
    linear_5: "f32[2, 8, 32]" = aten.linear.default(reshape_1, p_blocks_1_attn_proj_weight, p_blocks_1_attn_proj_bias)  # unit=blocks.1; flops=32768
    dropout_3: "f32[2, 8, 32]" = aten.dropout.default(linear_5, 0.0, True)  # unit=blocks.1
    add_3: "f32[2, 8, 32]" = aten.add.Tensor(add_2, dropout_3)  # unit=blocks.1
    layer_norm_3: "f32[2, 8, 32]" = aten.layer_norm.default(add_3, [32], p_blocks_1_ln_2_weight, p_blocks_1_ln_2_bias, 1e-05, False)  # unit=blocks.1
    linear_6: "f32[2, 8, 128]" = aten.linear.default(layer_norm_3, p_blocks_1_mlp_up_weight, p_blocks_1_mlp_up_bias)  # unit=blocks.1; flops=131072
    gelu_1: "f32[2, 8, 128]" = aten.gelu.default(linear_6, approximate='tanh')  # unit=blocks.1
    linear_7: "f32[2, 8, 32]" = aten.linear.default(gelu_1, p_blocks_1_mlp_down_weight, p_blocks_1_mlp_down_bias)  # unit=blocks.1; flops=131072
    dropout_4: "f32[2, 8, 32]" = aten.dropout.default(linear_7, 0.0, True)  # unit=blocks.1
    add_4: "f32[2, 8, 32]" = aten.add.Tensor(add_3, dropout_4)  # unit=blocks.1
    return (add_4,)

# unit head (self.unit_head): reads 3 parameters, 0 buffers
def forward(self, add_4: "f32[2, 8, 32]", labels: "i64[2, 8]", p_ln_f_weight: "f32[32]", p_ln_f_bias: "f32[32]", p_lm_head_weight: "f32[64, 32]"):
    layer_norm_4: "f32[2, 8, 32]" = aten.layer_norm.default(add_4, [32], p_ln_f_weight, p_ln_f_bias, 1e-05, False)  # unit=head
    linear_8: "f32[2, 8, 64]" = aten.linear.default(layer_norm_4, p_lm_head_weight)  # unit=head; flops=65536
    slice_2: "i64[2, 7]" = aten.slice.Tensor(labels, 1, 1, 9223372036854775807)  # unit=head
    reshape_3: "i64[14]" = aten.reshape.default(slice_2, [-1])  # unit=head
    linear_cross_entropy: "f32[]" = ratel.linear_cross_entropy(layer_norm_4, p_lm_head_weight, None, reshape_3, -100, 1, 1048576, (0, -1))  # unit=head; flops=57344; by chunk_head_loss
    return (linear_8, linear_cross_entropy)

# schedule: step stage kind subject bytes src->dst needed_by [slot] (dynamic: who issues it)
#     0 before fetch_params embed 10.00 KiB host->gpu needed_by=0 slot=0
#     0 before fetch_params blocks.0 49.75 KiB host->gpu needed_by=1 slot=1
#     0 after  offload_activation dropout 2.00 KiB gpu->host needed_by=6
#     0 after  release_params embed 10.00 KiB gpu->- needed_by=0 slot=0
#     1 before fetch_params blocks.1 49.75 KiB host->gpu needed_by=2 slot=0
#     1 after  offload_activation add_2 2.00 KiB gpu->host needed_by=5
#     1 after  release_params blocks.0 49.75 KiB gpu->- needed_by=1 slot=1
#     2 before fetch_params head 8.25 KiB host->gpu needed_by=3 slot=1
#     2 after  release_params blocks.1 49.75 KiB gpu->- needed_by=2 slot=0
#     3 before fetch_params blocks.1 49.75 KiB host->gpu needed_by=5 slot=0
#     4 before fetch_activation add_2 2.00 KiB host->gpu needed_by=5
#     4 after  flush_grads head 8.25 KiB gpu->host needed_by=4
#     4 after  optimizer_step head 1.00 KiB host->host needed_by=8
#     4 after  release_params head 8.25 KiB gpu->- needed_by=4 slot=1
#     4 after  release_activation add_4 2.00 KiB gpu->- needed_by=4
#     4 after  release_activation labels 128 B gpu->- needed_by=4
#     5 before fetch_params blocks.0 49.75 KiB host->gpu needed_by=6 slot=1
#     5 before fetch_activation dropout 2.00 KiB host->gpu needed_by=6
#     5 after  flush_grads blocks.1 49.62 KiB gpu->host needed_by=5
#     5 after  optimizer_step blocks.1 198.50 KiB host->host needed_by=8
#     5 after  release_params blocks.1 49.75 KiB gpu->- needed_by=5 slot=0
#     5 after  release_activation add_2 2.00 KiB gpu->- needed_by=5
#     6 before fetch_params embed 10.00 KiB host->gpu needed_by=7 slot=0
#     6 after  flush_grads blocks.0 49.62 KiB gpu->host needed_by=6
#     6 after  optimizer_step blocks.0 198.50 KiB host->host needed_by=8
#     6 after  release_params blocks.0 49.75 KiB gpu->- needed_by=6 slot=1
#     6 after  release_activation dropout 2.00 KiB gpu->- needed_by=6
#     7 after  flush_grads embed 10.00 KiB gpu->host needed_by=7
#     7 after  optimizer_step embed 8.00 KiB host->host needed_by=8
#     7 after  optimizer_step embed+head 32.00 KiB host->host needed_by=8
#     7 after  release_params embed 10.00 KiB gpu->- needed_by=7 slot=0
#     7 after  release_activation input_ids 128 B gpu->- needed_by=7
