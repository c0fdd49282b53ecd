// spm_model.cpp — see spm_model.h.
#include "tokenizer/spm_model.h"

#include <sentencepiece_processor.h>

#include "core/error.h"
#include "core/file_util.h"

namespace moe {

struct SpmModel::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SpmModel::SpmModel() : impl_(std::make_unique<Impl>()) {}
SpmModel::~SpmModel() = default;

std::unique_ptr<SpmModel> SpmModel::load_file(const std::string& path) {
  return load_bytes(read_file(path, kMaxTokenizerFileBytes), path);
}

std::unique_ptr<SpmModel> SpmModel::load_bytes(std::string_view bytes, const std::string& origin) {
  MOE_CHECK(!bytes.empty(), "%s: the SentencePiece model file is empty", origin.c_str());
  std::unique_ptr<SpmModel> m(new SpmModel());
  m->origin_ = origin;
  const auto status = m->impl_->sp.LoadFromSerializedProto(bytes);
  if (!status.ok()) {
    const std::string msg = status.ToString();
    // The library reports a protobuf parse failure only as the failed source line.
    if (msg.find("ParseFromArray") != std::string::npos)
      MOE_FAIL("%s: not a valid SentencePiece model (the %zu bytes do not parse as a ModelProto: corrupt or "
               "truncated file?)", origin.c_str(), bytes.size());
    MOE_FAIL("%s: not a valid SentencePiece model: %s", origin.c_str(), msg.c_str());
  }
  MOE_CHECK(m->impl_->sp.GetPieceSize() > 0, "%s: the SentencePiece model has no pieces", origin.c_str());
  return m;
}

void SpmModel::encode(std::string_view text, std::vector<int32_t>* out) const {
  thread_local std::vector<int> ids;
  ids.clear();
  const auto status = impl_->sp.Encode(text, &ids);
  MOE_CHECK(status.ok(), "%s: SentencePiece encode failed: %s", origin_.c_str(), status.ToString().c_str());
  out->insert(out->end(), ids.begin(), ids.end());
}

std::string SpmModel::decode(const std::vector<int32_t>& ids) const {
  const std::vector<int> v(ids.begin(), ids.end());
  std::string text;
  const auto status = impl_->sp.Decode(v, &text);
  MOE_CHECK(status.ok(), "%s: SentencePiece decode failed: %s", origin_.c_str(), status.ToString().c_str());
  return text;
}

int32_t SpmModel::size() const { return impl_->sp.GetPieceSize(); }
const std::string& SpmModel::piece(int32_t id) const { return impl_->sp.IdToPiece(id); }

int32_t SpmModel::find(std::string_view piece) const {
  // PieceToId answers unk_id for an unknown piece: check that the id really is this piece.
  const int id = impl_->sp.PieceToId(piece);
  return id >= 0 && id < size() && impl_->sp.IdToPiece(id) == piece ? id : -1;
}

bool SpmModel::is_control(int32_t id) const { return impl_->sp.IsControl(id); }
bool SpmModel::is_unknown(int32_t id) const { return impl_->sp.IsUnknown(id); }
int32_t SpmModel::bos_id() const { return impl_->sp.bos_id(); }
int32_t SpmModel::eos_id() const { return impl_->sp.eos_id(); }
int32_t SpmModel::unk_id() const { return impl_->sp.unk_id(); }
int32_t SpmModel::pad_id() const { return impl_->sp.pad_id(); }

}  // namespace moe
