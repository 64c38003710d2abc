// The smallest program a user writes: include the one header, batch, print.
#include <microbatch/microbatch.hpp>

#include <cstdio>
#include <span>
#include <vector>

struct Lookup {
  int key;
};
struct Answer {
  int key;
  int value;
};

int main() {
  auto square_all = [](std::span<Lookup> lookups) {
    std::vector<Answer> answers;
    for (const Lookup& lookup : lookups)
      answers.push_back({lookup.key, lookup.key * lookup.key});
    return answers;
  };
  microbatch::Batcher batcher(square_all, &Lookup::key, &Answer::key);
  const int value = batcher.execute_job({12}).value;
  std::printf("consumer: 12 squared is %d\n", value);
  return value == 144 ? 0 : 1;
}
